"""A DHT-only probe for the lab: one `DHTNode` (client mode) on its own `Libp2pNetwork`, driven by JSON lines.

Why a probe: in a lab-sized swarm every record sits on every peer (a store goes to the k = 20
closest peers of each cluster level, i.e. everyone), and `potluck serve`'s `dht_get` answers from
its own copy first — so timing `dht_get` measures the control socket, not a lookup. The probe
holds no records (client mode), reads with `use_local=False`, and can store into one cluster level
only (`levels=[2]`: "this region's copy"), so a read from another region has to leave its region.

Its identity is drawn so that its node id ranks above every peer named with `--above` (and above
99 % of the id space): cluster labels spread from the lowest-id landmark, so a probe never becomes
one and never relabels the swarm it measures. It advertises no address, so nobody adds it to a
routing table or stores to it.

    python -m netlab.dhtprobe --listen /ip4/IP/tcp/PORT --region eu --bootstrap ADDR [--above ID ...]

prints `peer <id>` and `ready` once its DHT is ready, then answers one JSON line per JSON line read
on stdin (`op`: status | warm | store | lookup | quit). Exits after --lifetime seconds or on EOF.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

import trio

HIGH_RANK = (1 << 256) * 99 // 100
MAX_DRAWS = 100_000


def high_rank_identity(above: list[str]):
    from dht.ids import node_id
    from p2p.identity import Identity

    floor = max([HIGH_RANK, *(node_id(p) for p in above)])
    for _ in range(MAX_DRAWS):  # ~100 draws expected
        ident = Identity.generate()
        if node_id(ident.peer_id) > floor:
            return ident
    raise RuntimeError(f"no identity ranked above the swarm in {MAX_DRAWS} draws")


async def _lookup(node, key: str, levels) -> dict:
    t = time.perf_counter()
    r = await node.lookup_value(key, use_local=False, levels=levels)
    ms = (time.perf_counter() - t) * 1000
    return {"key": key, "ms": round(ms, 3), "found": r.found, "level": r.level, "hops": r.hops,
            "messages": r.messages, "holders": sorted(set(r.holders))}


async def _serve(node, args) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        op = req.get("op")
        try:
            with trio.fail_after(float(req.get("timeout", 60))):
                if op == "quit":
                    return
                if op == "status":
                    out = node.status()
                    out["rtt_ms"] = {p: round(node.rtt_estimate(p) * 1000, 2) for p in node.peers
                                     if node.rtt_estimate(p) is not None}
                elif op == "warm":
                    # FIND_NODE walks at every level: connects to everyone, samples RTTs, settles labels.
                    from dht.ids import node_id

                    for i in range(int(req.get("rounds", 2))):
                        for level in node.clusters_view.levels:
                            await node.find_closest(node_id(f"warm-{i}-{level}"), level)
                    out = node.status()
                elif op == "store":
                    acks = []
                    for key in req["keys"]:
                        acks.append(await node.store(key, req.get("value", key), ttl=float(req.get("ttl", 600)),
                                                     levels=req.get("levels"), republish=False))
                    out = {"acks": acks}
                elif op == "lookup":
                    out = {"results": [await _lookup(node, k, req.get("levels")) for k in req["keys"]]}
                else:
                    out = {"error": f"unknown op {op!r}"}
        except Exception as e:  # noqa: BLE001 - report, keep serving
            out = {"error": f"{type(e).__name__}: {e}"[:600]}
        print(json.dumps(out), flush=True)


async def _run(args: argparse.Namespace) -> int:
    from dht.node import DHTNode
    from p2p.libp2p import Libp2pNetwork

    with trio.move_on_after(args.lifetime):
        async with Libp2pNetwork.open(high_rank_identity(args.above), [args.listen]) as net:
            node = DHTNode(net, bootstrap=args.bootstrap, client_mode=True, region=args.region or None)
            async with trio.open_nursery() as nursery:
                await nursery.start(node.run)
                print(f"peer {net.peer_id}", flush=True)
                with trio.fail_after(60):
                    await node.ready.wait()
                print("ready", flush=True)
                await _serve(node, args)
                nursery.cancel_scope.cancel()
    return 0


def level2_by_region(peers) -> dict[str, set[str]]:
    """Each region's level-2 cluster labels, as its `potluck serve` peers report them."""
    by: dict[str, set[str]] = {}
    for p in peers:
        by.setdefault(p.host.region, set()).add(p.call("status")["dht"]["clusters"]["2"])
    return by


def settle_clusters(peers, timeout: float = 120.0) -> float:
    """Wait until every region is one level-2 cluster, a different one each; returns the seconds it took.

    Labels are re-decided on DHT messages, and an idle peer only pings a few contacts per 30 s
    maintenance round; a swarm in use settles within seconds. So use it: each peer stores a
    short-lived record every second until the regions agree."""
    start = time.monotonic()
    rounds = itertools.count()
    while True:
        by = level2_by_region(peers)
        if all(len(v) == 1 for v in by.values()) and len(set().union(*by.values())) == len(by):
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"regions did not become level-2 clusters in {timeout}s: {by}")
        i = next(rounds)
        for p in peers:
            p.call("dht_store", key=f"warm/{p.peer_id}/{i}", value=i, ttl=60)
        time.sleep(1.0)


class Probe:
    """The harness side: a probe process in `host`'s namespace, owned by `lab` (killed when it closes)."""

    def __init__(self, lab, host, bootstrap: list[str], *, above: Sequence[str] = (), port: int = 4500,
                 lifetime: float = 600.0, timeout: float = 60.0):
        import subprocess

        from .topology import REPO_ROOT, _read_line

        self._read_line = _read_line
        self.host = host
        args = [sys.executable, "-m", "netlab.dhtprobe", "--listen", f"/ip4/{host.ip}/tcp/{port}",
                "--region", host.region, "--lifetime", str(lifetime)]
        for b in bootstrap:
            args += ["--bootstrap", b]
        for a in above:
            args += ["--above", a]
        self.log_path = lab.workdir / f"dhtprobe-{host.name}-{port}.log"
        with open(self.log_path, "ab") as log:
            self.proc = host.popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                   cwd=str(REPO_ROOT), bufsize=0)
        lab.procs.append(self.proc)
        self.peer_id = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = _read_line(self.proc, max(0.0, deadline - time.monotonic())).strip()
            if line.startswith("peer "):
                self.peer_id = line.split()[1]
            elif line == "ready":
                return
            elif not line:
                break
        raise RuntimeError(f"DHT probe in {host.name} did not start: {self.log_path.read_text()[-2000:]}")

    def ask(self, op: str, timeout: float = 60.0, **fields) -> dict:
        self.proc.stdin.write((json.dumps({"op": op, "timeout": timeout, **fields}) + "\n").encode())
        self.proc.stdin.flush()
        line = self._read_line(self.proc, timeout + 10)
        if not line:
            raise RuntimeError(f"DHT probe in {self.host.name} did not answer {op!r}: {self.log_path.read_text()[-2000:]}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"DHT probe {op!r}: {out['error']}")
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netlab.dhtprobe")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    p.add_argument("--bootstrap", action="append", default=[])
    p.add_argument("--region", default="")
    p.add_argument("--above", action="append", default=[], help="peer id the probe's node id must rank above")
    p.add_argument("--lifetime", type=float, default=600.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    return trio.run(_run, args)


if __name__ == "__main__":
    sys.exit(main())
