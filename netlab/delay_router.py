"""A userspace delay line for IPv4 packets: reads packets from a TUN device, holds each one for its
link's one-way delay (plus jitter, maybe dropping it), then writes it back to the same TUN device.

Why: `tc qdisc … netem` is not available in our kernels. The router namespace steers every packet it
forwards between hosts into the TUN device `dly0` (policy routing: packets that did *not* arrive on
`dly0` use a table whose default route is `dly0`); this process delays them and writes them back;
the kernel sees them arrive on `dly0` and routes them with the main table to the destination host's
veth. So each forwarded packet crosses the delay line exactly once, and the kernel does the rest
(ARP, TTL, ICMP, iptables, tbf rate limits on the veths).

Links are classified by region: an address belongs to the region whose prefix (from the config) it
falls in; the one-way delay of a packet is the delay of (source region, destination region). Order is
kept per (source address, destination address) pair: jitter never reorders packets of one flow
(reordering would make TCP retransmit and look like loss), as with netem + a rate.

One process, one thread: `select` on the TUN fd with the time to the next due packet as timeout
(select takes microseconds, unlike epoll's milliseconds), a heap of (due, seq, packet), and batched
non-blocking reads. Measured numbers are in the module `netlab.bench_router` output / bench.netns.

Config (JSON file, re-read on SIGHUP):
    {"tun": "dly0", "regions": {"10.77.1.0/24": "eu", ...},
     "links": {"eu>us": {"delay_ms": 40, "jitter_ms": 2, "loss": 0.0}, ...},   # one-way, directed
     "default": {"delay_ms": 0, "jitter_ms": 0, "loss": 0.0},
     "stats": "/path/to/stats.json"}
`links` keys are "A>B"; a missing "B>A" falls back to "A>B" (symmetric).
Stats (packets, drops, lateness percentiles in µs) are written to `stats` on SIGUSR1 and on exit.

Run: `ip netns exec ROUTER python -m netlab.delay_router CONFIG` — prints `ready` once the TUN is up.
"""

from __future__ import annotations

import fcntl
import heapq
import ipaddress
import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MAX_PACKET = 65536
READ_BATCH = 256
MAX_QUEUE = 100_000  # packets held at once; beyond this new packets are dropped (a bounded buffer)
LATENESS_SAMPLES = 20_000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


class Links:
    """Per-(source, destination) delay parameters, looked up by the packets' address prefixes."""

    def __init__(self, config: dict):
        nets = [(ipaddress.ip_network(p), r) for p, r in config.get("regions", {}).items()]
        # Most specific prefix first.
        self.nets = sorted(nets, key=lambda nr: -nr[0].prefixlen)
        self.default = self._params(config.get("default", {}))
        self.links: dict[tuple[str, str], tuple[float, float, float]] = {}
        for key, spec in config.get("links", {}).items():
            a, b = key.split(">")
            self.links[(a, b)] = self._params(spec)
        for (a, b), params in list(self.links.items()):
            self.links.setdefault((b, a), params)
        self._region_cache: dict[bytes, str | None] = {}
        self._pair_cache: dict[bytes, tuple[float, float, float]] = {}

    @staticmethod
    def _params(spec: dict) -> tuple[float, float, float]:
        return (float(spec.get("delay_ms", 0)) / 1000, float(spec.get("jitter_ms", 0)) / 1000,
                float(spec.get("loss", 0.0)))

    def region(self, addr: bytes) -> str | None:
        cached = self._region_cache.get(addr, 0)
        if cached != 0:
            return cached  # type: ignore[return-value]
        ip = ipaddress.IPv4Address(addr)
        found = next((r for net, r in self.nets if ip in net), None)
        if len(self._region_cache) < 65536:
            self._region_cache[addr] = found
        return found

    def params(self, pair: bytes) -> tuple[float, float, float]:
        """`pair` is the 8 bytes source address + destination address of an IPv4 header."""
        cached = self._pair_cache.get(pair)
        if cached is None:
            src, dst = self.region(pair[:4]), self.region(pair[4:])
            cached = self.links.get((src, dst), self.default) if src and dst else self.default
            if len(self._pair_cache) < 65536:
                self._pair_cache[pair] = cached
        return cached


class Stats:
    def __init__(self) -> None:
        self.received = 0
        self.sent = 0
        self.dropped_loss = 0
        self.dropped_queue = 0
        self.write_errors = 0
        self.not_ipv4 = 0
        self.max_queue = 0
        self.lateness_us: list[float] = []  # reservoir of (write time - due time)
        self._seen = 0
        self._rng = random.Random(1)

    def late(self, seconds: float) -> None:
        self._seen += 1
        us = seconds * 1e6
        if len(self.lateness_us) < LATENESS_SAMPLES:
            self.lateness_us.append(us)
        else:
            j = self._rng.randrange(self._seen)
            if j < LATENESS_SAMPLES:
                self.lateness_us[j] = us

    def as_dict(self) -> dict:
        lat = sorted(self.lateness_us)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

        return {
            "received": self.received, "sent": self.sent, "dropped_loss": self.dropped_loss,
            "dropped_queue": self.dropped_queue, "write_errors": self.write_errors,
            "not_ipv4": self.not_ipv4, "max_queue": self.max_queue,
            "lateness_us": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0),
                            "samples": len(lat)},
        }


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def run(config_path: str) -> None:
    config = _load(config_path)
    tun_name = config.get("tun", "dly0")
    fd = open_tun(tun_name)
    subprocess.run(["ip", "link", "set", tun_name, "txqueuelen", "10000", "up"], check=True)
    links = Links(config)
    stats = Stats()
    rng = random.Random(config.get("seed"))

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    flags = {"stop": False, "reload": False, "dump": False}
    for sig, flag in ((signal.SIGTERM, "stop"), (signal.SIGINT, "stop"), (signal.SIGHUP, "reload"),
                      (signal.SIGUSR1, "dump")):
        def set_flag(signum: int, frame: object, flag: str = flag) -> None:
            flags[flag] = True

        signal.signal(sig, set_flag)

    if config.get("realtime", True):
        # Timing precision matters more than anything else this process does; it only ever blocks in
        # select, and the kernel's RT throttling keeps 5 % of each CPU for everyone else regardless.
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        except (OSError, AttributeError):
            try:
                os.nice(-10)
            except OSError:
                pass

    def dump() -> None:
        path = config.get("stats")
        if path:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(stats.as_dict(), f)
            os.replace(tmp, path)

    heap: list[tuple[float, int, bytes]] = []
    last_due: dict[bytes, float] = {}
    seq = 0
    now = time.monotonic
    read, write = os.read, os.write
    push, pop = heapq.heappush, heapq.heappop
    print("ready", flush=True)

    while not flags["stop"]:
        t = now()
        while heap and heap[0][0] <= t:
            due, _, pkt = pop(heap)
            try:
                write(fd, pkt)
                stats.sent += 1
            except OSError:
                stats.write_errors += 1
            stats.late(now() - due)
            t = now()
        timeout = max(0.0, heap[0][0] - t) if heap else 1.0
        ready, _, _ = select.select([fd, wake_r], [], [], timeout)
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except BlockingIOError:
                pass
            if flags["reload"]:
                flags["reload"] = False
                config = _load(config_path)
                links = Links(config)
            if flags["dump"]:
                flags["dump"] = False
                dump()
        if fd in ready:
            t = now()
            for _ in range(READ_BATCH):
                try:
                    pkt = read(fd, MAX_PACKET)
                except BlockingIOError:
                    break
                stats.received += 1
                if len(pkt) < 20 or pkt[0] >> 4 != 4:
                    stats.not_ipv4 += 1
                    continue
                pair = pkt[12:20]
                delay, jitter, loss = links.params(pair)
                if loss and rng.random() < loss:
                    stats.dropped_loss += 1
                    continue
                if len(heap) >= MAX_QUEUE:
                    stats.dropped_queue += 1
                    continue
                due = t + delay + (rng.uniform(-jitter, jitter) if jitter else 0.0)
                prev = last_due.get(pair)
                if prev is not None and due < prev:
                    due = prev  # keep each flow in order
                last_due[pair] = due
                if len(last_due) > 65536:
                    last_due.clear()
                seq += 1
                push(heap, (due, seq, pkt))
            if len(heap) > stats.max_queue:
                stats.max_queue = len(heap)
    dump()
    os.close(fd)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m netlab.delay_router CONFIG.json", file=sys.stderr)
        return 2
    run(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
