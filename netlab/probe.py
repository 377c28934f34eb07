"""Tiny network probes run inside namespaces: a TCP echo server and a TCP round-trip client.

    python -m netlab.probe serve PORT [--lifetime S]
    python -m netlab.probe rtt HOST PORT [--count N] [--size BYTES] [--interval S] [--timeout S]
    python -m netlab.probe connect HOST PORT [--timeout S]
    python -m netlab.probe bulk HOST PORT [--bytes N]          (TCP throughput through an echo server)
    python -m netlab.probe udp-serve PORT [--lifetime S]
    python -m netlab.probe udp-echo HOST PORT [--count N] [--interval S] [--wait S]   (delivery ratio)
    python -m netlab.probe udp-whoami PORT [--lifetime S]      (answers each datagram with "ip:port" of its sender)
    python -m netlab.probe udp-map PORT --server IP:PORT … [--wait S]   (how a NAT maps and filters, below)
    python -m netlab.probe udp-send HOST PORT [--count N]      (a few datagrams from an ephemeral port)

`udp-map` sends from local PORT to each `udp-whoami` server, prints {"observed": {server: "ip:port"}} (the
mapping each server sees), then listens `--wait` s and prints {"unsolicited": ["ip:port", …]}: the senders
of datagrams that came from anyone but those servers (through the NAT's filtering).

`rtt` and `connect` print one JSON object. Stdlib only, so they start in tens of milliseconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time


def serve(port: int, lifetime: float) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    srv.settimeout(0.5)
    print("ready", flush=True)
    deadline = time.monotonic() + lifetime

    def echo(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(lifetime)
        with conn:
            while time.monotonic() < deadline:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    while time.monotonic() < deadline:
        try:
            conn, _ = srv.accept()
        except socket.timeout:
            continue
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def udp_serve(port: int, lifetime: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.5)
    print("ready", flush=True)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        try:
            data, peer = sock.recvfrom(65536)
        except socket.timeout:
            continue
        sock.sendto(data, peer)


def udp_echo(host: str, port: int, count: int, interval: float, wait: float) -> dict:
    """Send `count` numbered datagrams, count the echoes that come back within `wait` s of the last send."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    got: set[int] = set()

    def drain() -> None:
        while True:
            try:
                data = sock.recv(2048)
            except BlockingIOError:
                return
            got.add(int(data.split(b":")[0]))

    for i in range(count):
        sock.sendto(f"{i}:".encode() + b"x" * 32, (host, port))
        drain()
        time.sleep(interval)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and len(got) < count:
        drain()
        time.sleep(0.005)
    return {"sent": count, "received": len(got), "delivery": round(len(got) / count, 4) if count else None}


def udp_whoami(port: int, lifetime: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.5)
    print("ready", flush=True)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        try:
            _, (ip, src_port) = sock.recvfrom(2048)
        except socket.timeout:
            continue
        sock.sendto(f"{ip}:{src_port}".encode(), (ip, src_port))


def udp_map(port: int, servers: list[tuple[str, int]], wait: float, out=sys.stdout) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.settimeout(0.1)
    observed: dict[str, str] = {}
    for _ in range(20):  # a datagram may be lost; ask again until every server answered
        for server in servers:
            if f"{server[0]}:{server[1]}" not in observed:
                sock.sendto(b"whoami", server)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            try:
                data, (ip, src_port) = sock.recvfrom(2048)
            except socket.timeout:
                continue
            if (ip, src_port) in servers:
                observed[f"{ip}:{src_port}"] = data.decode(errors="replace")[:64]
        if len(observed) == len(servers):
            break
    print(json.dumps({"observed": observed}), file=out, flush=True)
    unsolicited: list[str] = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            _, (ip, src_port) = sock.recvfrom(2048)
        except socket.timeout:
            continue
        if (ip, src_port) not in servers and f"{ip}:{src_port}" not in unsolicited:
            unsolicited.append(f"{ip}:{src_port}")
    print(json.dumps({"unsolicited": unsolicited}), file=out, flush=True)


def udp_send(host: str, port: int, count: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(count):
        sock.sendto(b"unsolicited", (host, port))
        time.sleep(0.02)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def rtt(host: str, port: int, count: int, size: int, interval: float, timeout: float) -> dict:
    start = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=timeout)
    connect_ms = (time.perf_counter() - start) * 1000
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    payload = b"x" * size
    samples = []
    failures = 0
    with sock:
        for _ in range(count):
            t = time.perf_counter()
            try:
                sock.sendall(payload)
                _recv_exact(sock, size)
            except (OSError, ConnectionError):
                failures += 1
                break
            samples.append((time.perf_counter() - t) * 1000)
            if interval:
                time.sleep(interval)
    s = sorted(samples)
    return {
        "connect_ms": round(connect_ms, 3),
        "rtts_ms": [round(x, 3) for x in samples],
        "min_ms": round(s[0], 3) if s else None,
        "median_ms": round(statistics.median(s), 3) if s else None,
        "p90_ms": round(s[int(0.9 * (len(s) - 1))], 3) if s else None,
        "failures": failures,
    }


def bulk(host: str, port: int, total: int, timeout: float) -> dict:
    """Stream `total` bytes to an echo server and read them back; MB/s counts both directions."""
    sock = socket.create_connection((host, port), timeout=timeout)
    got = [0]

    def reader() -> None:
        while got[0] < total:
            try:
                chunk = sock.recv(1 << 20)
            except OSError:
                return
            if not chunk:
                return
            got[0] += len(chunk)

    start = time.perf_counter()
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    block = b"x" * 65536
    sent = 0
    with sock:
        while sent < total:
            n = min(len(block), total - sent)
            sock.sendall(block[:n])
            sent += n
        t.join(timeout)
    seconds = time.perf_counter() - start
    return {"bytes": total, "echoed": got[0], "seconds": round(seconds, 3),
            "mb_per_s": round(2 * got[0] / seconds / 1e6, 2)}


def connect(host: str, port: int, timeout: float) -> dict:
    start = time.perf_counter()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return {"ok": True, "ms": round((time.perf_counter() - start) * 1000, 3)}
    except OSError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "ms": round((time.perf_counter() - start) * 1000, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--lifetime", type=float, default=600.0)
    r = sub.add_parser("rtt")
    r.add_argument("host")
    r.add_argument("port", type=int)
    r.add_argument("--count", type=int, default=20)
    r.add_argument("--size", type=int, default=64)
    r.add_argument("--interval", type=float, default=0.0)
    r.add_argument("--timeout", type=float, default=5.0)
    b = sub.add_parser("bulk")
    b.add_argument("host")
    b.add_argument("port", type=int)
    b.add_argument("--bytes", type=int, default=8 << 20)
    b.add_argument("--timeout", type=float, default=30.0)
    us = sub.add_parser("udp-serve")
    us.add_argument("port", type=int)
    us.add_argument("--lifetime", type=float, default=600.0)
    ue = sub.add_parser("udp-echo")
    ue.add_argument("host")
    ue.add_argument("port", type=int)
    ue.add_argument("--count", type=int, default=200)
    ue.add_argument("--interval", type=float, default=0.002)
    ue.add_argument("--wait", type=float, default=1.0)
    uw = sub.add_parser("udp-whoami")
    uw.add_argument("port", type=int)
    uw.add_argument("--lifetime", type=float, default=600.0)
    um = sub.add_parser("udp-map")
    um.add_argument("port", type=int)
    um.add_argument("--server", action="append", default=[], required=True)
    um.add_argument("--wait", type=float, default=2.0)
    usd = sub.add_parser("udp-send")
    usd.add_argument("host")
    usd.add_argument("port", type=int)
    usd.add_argument("--count", type=int, default=5)
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=3.0)
    args = p.parse_args(argv)
    if args.cmd == "serve":
        serve(args.port, args.lifetime)
    elif args.cmd == "bulk":
        print(json.dumps(bulk(args.host, args.port, min(args.bytes, 1 << 30), args.timeout)))
    elif args.cmd == "udp-serve":
        udp_serve(args.port, args.lifetime)
    elif args.cmd == "udp-echo":
        print(json.dumps(udp_echo(args.host, args.port, min(args.count, 100_000), args.interval, args.wait)))
    elif args.cmd == "udp-whoami":
        udp_whoami(args.port, args.lifetime)
    elif args.cmd == "udp-map":
        servers = [(ip, int(p)) for ip, p in (s.rsplit(":", 1) for s in args.server)]
        udp_map(args.port, servers, min(args.wait, 60.0))
    elif args.cmd == "udp-send":
        udp_send(args.host, args.port, min(args.count, 1000))
    elif args.cmd == "rtt":
        print(json.dumps(rtt(args.host, args.port, min(args.count, 100_000), args.size, args.interval, args.timeout)))
    else:
        print(json.dumps(connect(args.host, args.port, args.timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
