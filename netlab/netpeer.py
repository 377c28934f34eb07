"""A bare p2p-layer peer for the lab: one `Libp2pNetwork` (public API only) with an echo handler.

For tests of the network layer on real namespaces without the rest of `potluck serve` (relaying,
the swarm key gate). Prints `peer <id>`, one `addr <multiaddr>` per `listen_addrs()` and `ready`;
with `--dial ADDR` it then connects, times `--count` echo requests and prints one JSON line:

    python -m netlab.netpeer --listen /ip4/IP/tcp/PORT --relay-service
    python -m netlab.netpeer --listen … --relay RELAY_ADDR                    # behind NAT
    python -m netlab.netpeer --listen … --dial CIRCUIT_ADDR --compare RELAY_ADDR --count 20
    python -m netlab.netpeer --swarm-key FILE …                               # a private swarm's member

With `--wait-direct S` the dialer then keeps sending echo requests for up to S seconds, until its
session with the peer runs on a direct connection (hole punching, `p2p.libp2p.holepunch`) and the
relayed one is gone, and adds "direct" (bool), "direct_after_s", "connections" (["direct"|"relayed", …]),
"switch_requests" / "switch_failures" (requests sent during the wait, and how many failed) and
"direct_median_ms".

The JSON line: {"ok", "peer", "connect_ms", "median_ms", "compare_median_ms", "error", …}. A failure to
start (e.g. every relay refused us) prints {"ok": false, "error": "<type>: <message>"} and exits 2.
Exits after --lifetime seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import trio

from p2p.errors import P2PError

ECHO = "/potluck/netpeer-echo/1.0.0"


async def _echo(peer: str, body: object) -> object:
    return body


async def _timed(net, peer: str, count: int, size: int) -> float:
    rtts = []
    for i in range(count):
        t = time.perf_counter()
        reply = await net.request(peer, ECHO, [i, b"x" * size], timeout=10)
        rtts.append((time.perf_counter() - t) * 1000)
        if reply[0] != i:
            raise RuntimeError("echo mismatch")
    return round(statistics.median(rtts), 2)


async def _until_direct(net, peer: str, wait: float) -> dict:
    """Echo requests back to back until only a direct connection to `peer` is left (or `wait` s)."""
    sent = failed = 0
    started = time.perf_counter()
    with trio.move_on_after(wait):
        while not (net.is_direct(peer) and net.connection_kinds(peer) == ["direct"]):
            sent += 1
            try:
                await net.request(peer, ECHO, [sent, b"x"], timeout=10)
            except P2PError:
                failed += 1
            await trio.sleep(0.02)
    return {"direct": net.is_direct(peer), "connections": net.connection_kinds(peer),
            "switch_requests": sent, "switch_failures": failed,
            "direct_after_s": round(time.perf_counter() - started, 2) if net.is_direct(peer) else None}


async def _run(args: argparse.Namespace) -> int:
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from p2p.swarm_key import load_key

    key = load_key(Path(args.swarm_key)) if args.swarm_key else None
    result: dict = {"ok": False}
    try:
        with trio.move_on_after(args.lifetime):
            async with Libp2pNetwork.open(Identity.generate(), [args.listen], swarm_key=key,
                                          relay_service=args.relay_service, relays=args.relay,
                                          hole_punch=not args.no_hole_punch) as net:
                net.set_request_handler(ECHO, _echo)
                print(f"peer {net.peer_id}", flush=True)
                for addr in net.listen_addrs():
                    print(f"addr {addr}", flush=True)
                print("ready", flush=True)
                if not args.dial:
                    await trio.sleep_forever()
                try:
                    t = time.perf_counter()
                    peer = await net.connect(args.dial, timeout=15)
                    result.update(peer=peer, connect_ms=round((time.perf_counter() - t) * 1000, 1))
                    result["median_ms"] = await _timed(net, peer, args.count, args.size)
                    if args.wait_direct:
                        result.update(await _until_direct(net, peer, args.wait_direct))
                        if result["direct"]:
                            result["direct_median_ms"] = await _timed(net, peer, args.count, args.size)
                    if args.compare:
                        other = await net.connect(args.compare, timeout=15)
                        result["compare_median_ms"] = await _timed(net, other, args.count, args.size)
                    result["ok"] = True
                except P2PError as e:
                    result["error"] = f"{type(e).__name__}: {e}"[:600]
                print(json.dumps(result), flush=True)
                return 0
    except P2PError as e:
        result["error"] = f"{type(e).__name__}: {e}"[:600]
        print(json.dumps(result), flush=True)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.netpeer")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--swarm-key")
    p.add_argument("--relay-service", action="store_true")
    p.add_argument("--relay", action="append", default=[])
    p.add_argument("--dial")
    p.add_argument("--compare", help="also time requests to this (direct) address")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--lifetime", type=float, default=120.0)
    p.add_argument("--wait-direct", type=float, default=0.0)
    p.add_argument("--no-hole-punch", action="store_true", help="stay on the relay (a baseline)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    return trio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
