"""Cost of one hop over our libp2p backend, against raw trio TCP on loopback in the same run.

`python -m bench.hop --json` measures, for both transports in one process on 127.0.0.1:
- the round trip of a 16 KiB request answered by a 16 KiB reply (median and p90 over `--rounds`);
  ours is `Libp2pNetwork.request` (Noise + yamux + our framing and id matching), the baseline is a
  4-byte length prefix + bytes, echoed back over one TCP connection;
- throughput of `--mib` MiB sent as 1 MiB messages over one long-lived stream (`open_stream`, with
  its flow control) until the receiver acknowledges the last one; the baseline sends the same frames
  over a TCP connection.
and the ratios (ours / TCP for time, TCP / ours for throughput).

It also times a first contact (`connect_announced`) with a server announcing 1–3 black holes (loopback
ports that accept TCP and never answer) before its real address, each dial within `--dial-timeout`:
dialled in turn (the baseline: the next address only once the one before failed) against staggered
(Happy Eyeballs, the next after `DIAL_STAGGER` while the one before is still pending).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import sys
import time
from contextlib import AsyncExitStack
from functools import partial

import trio

from p2p.errors import StreamClosed
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from pipeline.hop import DIAL_STAGGER, connect_announced

ECHO = "/potluck/bench-echo/1.0.0"
SINK = "/potluck/bench-sink/1.0.0"
_HDR = struct.Struct(">I")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- raw trio TCP baseline ---------------------------------------------------------------------------


async def _recv_exactly(stream: trio.SocketStream, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(max(65536, n - len(buf)))
        if not chunk:
            raise EOFError
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _tcp_echo_server(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            (n,) = _HDR.unpack(await _recv_exactly(stream, buf, 4))
            body = await _recv_exactly(stream, buf, n)
            await stream.send_all(_HDR.pack(len(body)) + body)
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _tcp_sink_server(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            (n,) = _HDR.unpack(await _recv_exactly(stream, buf, 4))
            body = await _recv_exactly(stream, buf, n)
            if body == b"done":
                await stream.send_all(b"ack!")
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class _TcpSide:
    """Echo and sink servers on raw trio TCP, plus the client connections to them."""

    async def start(self, nursery: trio.Nursery) -> None:
        echo_listeners = await nursery.start(partial(trio.serve_tcp, _tcp_echo_server, 0, host="127.0.0.1"))
        sink_listeners = await nursery.start(partial(trio.serve_tcp, _tcp_sink_server, 0, host="127.0.0.1"))
        self.echo = await trio.open_tcp_stream("127.0.0.1", echo_listeners[0].socket.getsockname()[1])
        self.sink_port = sink_listeners[0].socket.getsockname()[1]
        self.buf = bytearray()

    async def round_trip(self, payload: bytes) -> None:
        await self.echo.send_all(_HDR.pack(len(payload)) + payload)
        (n,) = _HDR.unpack(await _recv_exactly(self.echo, self.buf, 4))
        await _recv_exactly(self.echo, self.buf, n)

    async def bulk(self, mib: int) -> None:
        sink = await trio.open_tcp_stream("127.0.0.1", self.sink_port)
        chunk = b"t" * (1024 * 1024)
        for _ in range(mib):
            await sink.send_all(_HDR.pack(len(chunk)) + chunk)
        await sink.send_all(_HDR.pack(4) + b"done")
        await _recv_exactly(sink, bytearray(), 4)
        await sink.aclose()


class _Libp2pSide:
    """Two Libp2pNetwork peers: an echo request handler and a sink stream handler."""

    async def start(self, stack: AsyncExitStack) -> None:
        self.server = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate()))
        self.client = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate()))

        async def echo(peer_id, body):
            return body

        async def sink(stream):
            try:
                while True:
                    if await stream.receive() == b"done":
                        await stream.send(b"ack!")
            except StreamClosed:
                pass

        self.server.set_request_handler(ECHO, echo)
        self.server.set_stream_handler(SINK, sink)
        t0 = time.perf_counter()
        await self.client.connect(self.server.listen_addrs()[0])
        self.connect_ms = (time.perf_counter() - t0) * 1e3
        self.open_stream_ms = 0.0

    async def round_trip(self, payload: bytes) -> None:
        await self.client.request(self.server.peer_id, ECHO, payload)

    async def bulk(self, mib: int) -> None:
        t0 = time.perf_counter()
        stream = await self.client.open_stream(self.server.peer_id, SINK)
        self.open_stream_ms = (time.perf_counter() - t0) * 1e3
        chunk = b"t" * (1024 * 1024)
        for _ in range(mib):
            await stream.send(chunk)
        await stream.send(b"done")
        assert await stream.receive() == b"ack!"
        await stream.aclose()


async def _timed(fn, *args) -> tuple[float, float]:
    c0, t0 = time.process_time(), time.perf_counter()
    await fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


async def measure(args: argparse.Namespace) -> dict:
    """Both transports in one process; round trips alternate in blocks so both see the same load."""
    payload = b"r" * args.size
    out: dict = {"tcp": {"rtt": [], "rtt_cpu": 0.0, "bulk": []}, "libp2p": {"rtt": [], "rtt_cpu": 0.0, "bulk": []}}
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        tcp, ours = _TcpSide(), _Libp2pSide()
        await tcp.start(nursery)
        await ours.start(stack)
        sides: dict[str, _TcpSide | _Libp2pSide] = {"tcp": tcp, "libp2p": ours}
        for side in sides.values():
            for _ in range(args.warmup):
                await side.round_trip(payload)
        block = 100
        for _ in range(max(1, args.rounds // block)):
            for name, side in sides.items():
                for _ in range(block):
                    wall, cpu = await _timed(side.round_trip, payload)
                    out[name]["rtt"].append(wall)
                    out[name]["rtt_cpu"] += cpu
        for _ in range(args.bulk_repeats):
            for name, side in sides.items():
                out[name]["bulk"].append(await _timed(side.bulk, args.mib))
        out["connect_ms"], out["open_stream_ms"] = ours.connect_ms, ours.open_stream_ms
        nursery.cancel_scope.cancel()
    return out


MAX_BLACK_HOLES = 3


async def _black_hole(held: list[trio.socket.SocketType], task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A loopback port that accepts connections and never says a word; they are held in `held`."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        task_status.started(listener.getsockname()[1])
        while True:
            sock, _ = await listener.accept()
            held.append(sock)


async def first_contacts(each: float) -> dict:
    """Seconds to a first contact with a server announcing 1..MAX_BLACK_HOLES black holes before its
    real address, dialled in turn and staggered; a fresh client each time."""
    held: list[trio.socket.SocketType] = []
    out: dict = {}
    try:
        async with trio.open_nursery() as nursery, Libp2pNetwork.open(Identity.generate()) as server:
            ports = [await nursery.start(_black_hole, held) for _ in range(MAX_BLACK_HOLES)]
            holes = [f"/ip4/127.0.0.1/tcp/{port}/p2p/{server.peer_id}" for port in ports]
            for n in range(1, MAX_BLACK_HOLES + 1):
                addrs = [*holes[:n], server.listen_addrs()[0]]
                row = {}
                for name, stagger in (("in_turn", math.inf), ("staggered", DIAL_STAGGER)):
                    async with Libp2pNetwork.open(Identity.generate()) as client:
                        t0 = time.perf_counter()
                        reached = await connect_announced(client, server.peer_id, addrs, each=each, stagger=stagger)
                        row[name] = round(time.perf_counter() - t0, 3)
                        if not reached:
                            raise RuntimeError(f"no first contact past {n} black holes ({name})")
                row["in_turn_over_staggered"] = round(row["in_turn"] / row["staggered"], 1)
                out[f"black_holes_{n}"] = row
            nursery.cancel_scope.cancel()
    finally:
        for sock in held:
            sock.close()
    return out


def summarize(rtt: list[float]) -> dict:
    return {"median_ms": round(statistics.median(rtt) * 1e3, 4), "p90_ms": round(quantile(rtt, 0.9) * 1e3, 4)}


async def run(args: argparse.Namespace) -> dict:
    m = await measure(args)
    rtt = {name: summarize(m[name]["rtt"]) for name in ("libp2p", "tcp")}
    for name in rtt:
        rtt[name]["cpu_ms_per_round_trip"] = round(m[name]["rtt_cpu"] / len(m[name]["rtt"]) * 1e3, 4)
    # best of the repeats: the fastest run is the one least disturbed by other load on the machine
    tput = {name: args.mib / min(w for w, _ in m[name]["bulk"]) for name in ("libp2p", "tcp")}
    tput_cpu = {name: args.mib / min(c for _, c in m[name]["bulk"]) for name in ("libp2p", "tcp")}
    rtt_ratio = rtt["libp2p"]["median_ms"] / rtt["tcp"]["median_ms"]
    return {
        "bench": "hop",
        "request_bytes": args.size,
        "rounds": len(m["libp2p"]["rtt"]),
        "rtt_16k": rtt,
        "throughput_mib_s": {"libp2p": round(tput["libp2p"], 1), "tcp": round(tput["tcp"], 1),
                             "mib": args.mib, "message_mib": 1, "best_of": args.bulk_repeats},
        "throughput_per_cpu_second_mib": {name: round(v, 1) for name, v in tput_cpu.items()},
        "ratios": {
            "rtt_median_libp2p_over_tcp": round(rtt_ratio, 2),
            "rtt_p90_libp2p_over_tcp": round(rtt["libp2p"]["p90_ms"] / rtt["tcp"]["p90_ms"], 2),
            "rtt_cpu_libp2p_over_tcp": round(rtt["libp2p"]["cpu_ms_per_round_trip"] / rtt["tcp"]["cpu_ms_per_round_trip"], 2),
            "throughput_libp2p_over_tcp": round(tput["libp2p"] / tput["tcp"], 3),
        },
        "first_contact_s": {"dial_timeout_s": args.dial_timeout, "stagger_s": DIAL_STAGGER,
                            **await first_contacts(args.dial_timeout)},
        "libp2p_connect_ms": round(m["connect_ms"], 2),
        "libp2p_open_stream_ms": round(m["open_stream_ms"], 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "goal": {"rtt_median_ms_max": 1.5, "rtt_ratio_max": 3.0,
                 "met": rtt["libp2p"]["median_ms"] <= 1.5 and rtt_ratio <= 3.0},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--size", type=int, default=16 * 1024)
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--bulk-repeats", type=int, default=3)
    p.add_argument("--dial-timeout", type=float, default=3.0, help="each dial of a first contact (the client's)")
    p.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.mib, args.bulk_repeats, args.dial_timeout = 200, 20, 4, 1, 0.6
    result = trio.run(run, args)
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        print(f"{args.size} B round trip: libp2p {r['rtt_16k']['libp2p']} vs tcp {r['rtt_16k']['tcp']} "
              f"(x{r['ratios']['rtt_median_libp2p_over_tcp']})")
        print(f"throughput MiB/s: libp2p {r['throughput_mib_s']['libp2p']} vs tcp {r['throughput_mib_s']['tcp']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
