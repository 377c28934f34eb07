"""Feasibility check: py-libp2p 0.8.1 circuit relay v2 carrying a potluck session (p2p.libp2p_net).

NOT production code: it reaches into Libp2pNetwork's private attributes (`_host`, `_dial`, `_book`,
`_session`) to show what p2p/libp2p_net.py would need (see the netns report). Three roles, each a
process (run them in different namespaces):

    python -m netlab.relay_experiment relay  --listen /ip4/IP/tcp/PORT         # prints "addr <multiaddr>"
    python -m netlab.relay_experiment target --listen … --relay RELAY_ADDR     # prints "peer <id>" then "reserved"
    python -m netlab.relay_experiment dialer --listen … --relay RELAY_ADDR --target PEER_ID [--count N]
                                                                               # prints one JSON line

Each exits after --lifetime seconds (default 120).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import multiaddr
import trio

ECHO = "/potluck/relay-echo/1.0.0"


async def _run(args: argparse.Namespace) -> None:
    from libp2p.peer.id import ID
    from libp2p.relay.circuit_v2 import CircuitV2Protocol, CircuitV2Transport, RelayLimits
    from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP
    from libp2p.tools.anyio_service import background_trio_service

    from p2p.identity import Identity
    from p2p.libp2p_net import Libp2pNetwork

    limits = RelayLimits(duration=3600, data=1 << 30, max_circuit_conns=8, max_reservations=8)
    with trio.move_on_after(args.lifetime):
        async with Libp2pNetwork.open(Identity.generate(), [args.listen]) as net:
            async def echo(peer: str, body: object) -> object:
                return {"echo": body}

            net.set_request_handler(ECHO, echo)
            proto = CircuitV2Protocol(net._host, limits=limits, allow_hop=args.role == "relay")
            async with background_trio_service(proto), trio.open_nursery() as nursery:
                await proto.event_started.wait()
                if args.role == "relay":
                    print(f"addr {net.listen_addrs()[0]}", flush=True)
                    await trio.sleep_forever()
                relay_id = ID.from_base58(args.relay.rsplit("/p2p/", 1)[1])
                await net.connect(args.relay)
                transport = CircuitV2Transport(net._host, proto, RelayConfig(
                    roles=RelayRole.STOP | RelayRole.CLIENT, limits=limits))
                if args.role == "target":
                    print(f"peer {net.peer_id}", flush=True)
                    stream = await net._host.new_stream(relay_id, [HOP])
                    ok = await transport.reserve(stream, relay_id, nursery)
                    print("reserved" if ok else "reservation refused", flush=True)
                    await trio.sleep_forever()
                # dialer
                circuit = f"{args.relay}/p2p-circuit/p2p/{args.target}"
                result: dict = {"circuit": circuit}
                t = time.monotonic()
                try:
                    await transport.dial(multiaddr.Multiaddr(circuit))
                    result["relayed_connect_ms"] = round((time.monotonic() - t) * 1000, 1)
                    # Libp2pNetwork.connect() takes the FIRST /p2p/ of a circuit address (the relay's);
                    # the libp2p connection now exists, so _dial only opens our session on it.
                    t = time.monotonic()
                    await net._dial(args.target, multiaddr.Multiaddr(circuit))
                    net._book[args.target] = circuit
                    result["session_ms"] = round((time.monotonic() - t) * 1000, 1)
                    rtts = []
                    for i in range(args.count):
                        t = time.monotonic()
                        reply = await net.request(args.target, ECHO, {"i": i, "pad": b"x" * args.size}, timeout=10)
                        rtts.append((time.monotonic() - t) * 1000)
                        assert reply["echo"]["i"] == i
                    result.update(ok=True, requests=len(rtts), median_request_ms=round(sorted(rtts)[len(rtts) // 2], 1))
                except Exception as e:  # report, do not crash: this is an experiment
                    result.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
                print(json.dumps(result), flush=True)
                nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.relay_experiment")
    p.add_argument("role", choices=["relay", "target", "dialer"])
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--relay")
    p.add_argument("--target")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--lifetime", type=float, default=120.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    trio.run(_run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
