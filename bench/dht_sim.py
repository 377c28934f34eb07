"""Clustered vs plain Kademlia, the real dht/ code on the simulator: `python -m bench.dht_sim --nodes N [--json]`.

Topology. Peers are placed in 25 metro regions (dht.clusters.REGIONS) weighted by Internet users
(ITU/DataReportal 2023, millions, rounded: China 1,050, India 900, South-East Asia 250, Indonesia
210, US 310, Brazil 180, Russia 125, Nigeria 120, Japan 115, Mexico 100, southern Europe 94, Egypt
80, Germany/central Europe 78, Turkey 70, UK 66, France 60, Korea 50, South Africa 45, Canada 36,
Australia 25, Nordics 25), scattered around the metro centre (Gaussian, σ = 1.2° ≈ 130 km).
RTT is the simulator's model: great-circle distance at 2/3 c with 1.5× path stretch, plus both
peers' last-mile delays (per peer, lognormal, median 4 ms, clipped to 1–25 ms), with ±10 % jitter
per one-way message. A first contact costs one RTT of dialling before the request (the sim's model
of connection setup); connections then stay open.

Each peer starts with a `--region` hint naming its region (seeds its Vivaldi coordinate only;
`--no-region-hints` turns that off). Run. N peers join in waves through random already-joined peers (each: ping a bootstrap peer,
self-lookup, a few far-bucket refreshes, a self-lookup per cluster level), then a settle phase of
maintenance rounds (pings feed Vivaldi, clusters relabel and re-look themselves up). Then a few
percent of peers crash silently (dead contacts stay in tables), and during measurement more peers
leave and fresh ones join (churn) between batches.

Measured, on the same nodes, tables and world: for each looker, a key published by another peer of
its region ("in-region") and a key published by a random peer ("global"), each stored twice — once
clustered (all levels, looked up tightest cluster first with proximity selection) and once plain
(level 0 only, textbook XOR selection: the baseline) — and looked up once each. Latency is virtual
time from call to result; hops are the sequential RPC rounds on the path that found it; messages are
the RPCs the lookup sent; `found_at_level` counts which cluster level's walk found each value. Medians
come with means: a lookup takes one hop or two, and a median that sits between the two humps moves
between runs more than the mean does. The looker's own store is ignored (a replica it happens to hold would
be a free hit). Wall-clock time covers the whole run.

Liars (`--liars FRACTION`). After the honest measurement, that fraction of the peers (never a
looker) turns liar: it still answers pings and takes stores (so it stays in every table) but
answers every FIND_NODE / FIND_VALUE with no value and MAX_CONTACTS fake contacts — the closest to
the target of its own pool of 200 ids whose addresses are black holes (peers that are down in the
sim world, so a dial is never answered), each with a made-up coordinate far away. The same lookers
then look up a second set of keys, published like the first, and the figures under `under_liars`
compare with the honest ones (`liar_latency_ratio`: median with liars / median without).

The plain variant uses the same routing table as the clustered one (level 0 is plain Kademlia's
table: least-recently-seen eviction, no proximity neighbour selection); only the lookup and store
strategy differ. Both run on the same topology in the same run, so the ratio is like for like.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import trio
import trio.testing

from dht import protocol as proto
from dht.clusters import REGIONS
from dht.ids import key_id, node_id
from dht.node import DHTConfig, DHTNode
from dht.vivaldi import Coord
from p2p.identity import Identity
from p2p.sim import LatencyModel, Place, SimWorld

# millions of Internet users per region (see docstring)
REGION_WEIGHTS: dict[str, float] = {
    "cn-east": 550, "cn-north": 500, "in-west": 450, "in-south": 450, "sg": 250, "id": 210,
    "us-east": 130, "us-central": 90, "us-west": 90, "br-south": 180, "ru": 125, "ng": 120, "jp": 115,
    "mx": 100, "eu-south": 94, "eg": 80, "eu-central": 78, "tr": 70, "uk": 66, "eu-west": 60, "kr": 50,
    "za": 45, "ca-central": 36, "au-east": 25, "eu-north": 25,
}


def random_place(rng: random.Random, region: str | None = None, spread_deg: float = 1.2) -> Place:
    if region is None:
        names = list(REGION_WEIGHTS)
        region = rng.choices(names, weights=[REGION_WEIGHTS[n] for n in names])[0]
    lat, lon = REGIONS[region]
    last_mile = min(max(rng.lognormvariate(math.log(4.0), 0.5), 1.0), 25.0)
    return Place(lat + rng.gauss(0, spread_deg), lon + rng.gauss(0, spread_deg), region, last_mile)


@dataclass
class Swarm:
    world: SimWorld
    nursery: trio.Nursery
    config: DHTConfig
    rng: random.Random
    nodes: list[DHTNode] = field(default_factory=list)
    scopes: dict[str, trio.CancelScope] = field(default_factory=dict)
    region_of: dict[str, str] = field(default_factory=dict)
    hint_regions: bool = False
    progress: bool = False

    @property
    def alive(self) -> list[DHTNode]:
        return [n for n in self.nodes if n.peer_id in self.scopes]

    async def add(self, place: Place, bootstrap: list[str], client_mode: bool = False) -> DHTNode:
        sim = self.world.add_node(place=place)
        node = DHTNode(sim, bootstrap=bootstrap, config=self.config, client_mode=client_mode,
                       region=place.region if self.hint_regions else None, seed=self.rng.getrandbits(32))
        self.nodes.append(node)
        self.region_of[node.peer_id] = place.region
        await self.nursery.start(self._run, node)
        return node

    async def _run(self, node: DHTNode, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.scopes[node.peer_id] = scope
            await node.run(task_status=task_status)

    async def grow(self, n: int, *, wave: int = 100, place_fn=None) -> None:
        """Add `n` peers, `wave` at a time joining concurrently, each through a random joined peer."""
        place_fn = place_fn or (lambda: random_place(self.rng))
        if not self.nodes:
            await self.add(place_fn(), [])
            n -= 1
        while n > 0:
            if self.progress and len(self.nodes) % 1000 < wave:
                print(f"[dht_sim] {len(self.nodes)} peers joined, virtual {trio.current_time():.0f} s", file=sys.stderr)
            batch = min(wave, n)
            joined = [x for x in self.alive if not x.client_mode]
            async with trio.open_nursery() as tmp:
                for _ in range(batch):
                    boot = self.rng.choice(joined)
                    tmp.start_soon(self.add, place_fn(), [boot.addr])
            n -= batch

    def crash(self, node: DHTNode) -> None:
        """The peer vanishes: its process stops and the network drops its connections."""
        scope = self.scopes.pop(node.peer_id, None)
        if scope is not None:
            scope.cancel()
        self.world.crash(node.peer_id)

    async def settle(self, rounds: int) -> None:
        """Run `rounds` maintenance rounds on every live peer, spread over virtual time."""
        for _ in range(rounds):
            async with trio.open_nursery() as tmp:
                for node in self.alive:
                    tmp.start_soon(self._round, node)

    async def _round(self, node: DHTNode) -> None:
        await trio.sleep(self.rng.random() * 5)
        try:
            await node._maintenance_round()
        except Exception:  # a crashed peer's round fails; that is churn, not a bench failure
            pass


FAR_AWAY = Coord(9.0, 9.0, 0.5, 0.01)  # what a liar claims for its fakes: waiting for them looks reasonable


def black_holes(world: SimWorld, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` (peer id, address) pairs of sim peers that are down: a dial to one is never answered."""
    out = []
    own = random.Random(rng.getrandbits(64))  # not the world's sequence of identities, even if seeded alike
    for _ in range(n):
        sim = world.add_node(identity=Identity(own.randbytes(32)), place=random_place(own))
        world.crash(sim.peer_id)
        out.append((sim.peer_id, sim.addr))
    return out


def turn_liar(node: DHTNode, fakes: list[tuple[str, str]]) -> None:
    """`node` answers every FIND_NODE / FIND_VALUE with no value and the MAX_CONTACTS fakes closest
    to the target; pings and stores it answers honestly, so it stays in its peers' tables."""
    pool = [(node_id(peer_id), proto.encode_contact(peer_id, addr, FAR_AWAY)) for peer_id, addr in fakes]

    async def handle(sender: str, body: Any) -> Any:
        req = proto.decode_request(sender, body)
        if req.op not in ("find_node", "find_value"):
            return await node._handle(sender, body)
        target = req.target if req.op == "find_node" else key_id(req.key)
        closest = sorted(pool, key=lambda fake: fake[0] ^ target)[: proto.MAX_CONTACTS]
        return {"i": node._info(), "n": [contact for _, contact in closest], "e": []}

    node.network.set_request_handler(node.config.protocol, handle)


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@dataclass
class Tally:
    latency: list[float] = field(default_factory=list)
    hops: list[int] = field(default_factory=list)
    messages: list[int] = field(default_factory=list)
    levels: dict[str, int] = field(default_factory=dict)  # cluster level whose walk found the value
    tried: int = 0
    ok: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "lookups": self.tried,
            "success_rate": round(self.ok / self.tried, 4) if self.tried else None,
            "latency_ms_median": _r(pct(self.latency, 0.5), 1000),
            "latency_ms_p90": _r(pct(self.latency, 0.9), 1000),
            "latency_ms_mean": _r(statistics.mean(self.latency), 1000) if self.latency else None,
            "hops_median": pct(self.hops, 0.5),
            "hops_p90": pct(self.hops, 0.9),
            "messages_per_lookup": round(statistics.mean(self.messages), 1) if self.messages else None,
            "found_at_level": dict(sorted(self.levels.items())),
        }


def _r(v: float | None, scale: float = 1.0) -> float | None:
    return None if v is None else round(v * scale, 1)


async def timed_lookup(node: DHTNode, key: str, tally: Tally, **kw) -> None:
    start = trio.current_time()
    tally.tried += 1
    result = await node.lookup_value(key, use_local=False, **kw)
    if result.found:
        tally.ok += 1
        tally.latency.append(trio.current_time() - start)
        tally.hops.append(result.hops)
        level = str(result.level)
        tally.levels[level] = tally.levels.get(level, 0) + 1
    tally.messages.append(result.messages)


def vivaldi_error(swarm: Swarm, samples: int = 2000) -> float:
    """Median relative error |est - true| / true of Vivaldi estimates over random live pairs."""
    alive = swarm.alive
    errs = []
    for _ in range(samples):
        a, b = swarm.rng.sample(alive, 2)
        true = swarm.world.rtt(a.peer_id, b.peer_id)
        est = a.coordinate.rtt_to(b.coordinate)
        errs.append(abs(est - true) / true)
    return statistics.median(errs)


TALLIES = ("clustered_in_region", "plain_in_region", "clustered_global", "plain_global")


async def measure(swarm: Swarm, jobs: list[tuple[DHTNode, dict[str, str]]], churn_fraction: float, wave: int,
                  rng: random.Random) -> dict[str, Tally]:
    """Every looker's four lookups, in 5 batches with churn between them."""
    tallies = {name: Tally() for name in TALLIES}
    batches = 5
    for b in range(batches):
        async with trio.open_nursery() as tmp:
            for looker, keys in jobs[b::batches]:
                if looker.peer_id not in swarm.scopes:
                    continue
                tmp.start_soon(timed_lookup, looker, keys["rc"], tallies["clustered_in_region"])
                tmp.start_soon(lambda l=looker, k=keys["rp"]: timed_lookup(l, k, tallies["plain_in_region"], levels=[0], select="xor"))
                tmp.start_soon(timed_lookup, looker, keys["gc"], tallies["clustered_global"])
                tmp.start_soon(lambda l=looker, k=keys["gp"]: timed_lookup(l, k, tallies["plain_global"], levels=[0], select="xor"))
        # churn between batches: some leave, as many fresh peers join
        leaving = int(churn_fraction * len(swarm.alive))
        lookers_alive = {l.peer_id for l, _ in jobs}
        for node in rng.sample([n for n in swarm.alive if n.peer_id not in lookers_alive], leaving):
            swarm.crash(node)
        await swarm.grow(leaving, wave=wave)
    return tallies


async def run_bench(nodes: int, *, lookups: int, seed: int, dead_fraction: float, churn_fraction: float,
                    settle_rounds: int, wave: int, region_hints: bool = True, liar_fraction: float = 0.0) -> dict[str, Any]:
    wall0 = time.perf_counter()
    rng = random.Random(seed)
    out: dict[str, Any] = {"nodes": nodes, "region_hints": region_hints, "dead_fraction": dead_fraction,
                           "churn_per_batch": churn_fraction, "liar_fraction": liar_fraction}
    async with SimWorld.open(seed=seed, latency=LatencyModel(jitter=0.1, seed=seed)) as world:
        async with trio.open_nursery() as nursery:
            swarm = Swarm(world, nursery, DHTConfig(), rng, hint_regions=region_hints, progress=nodes >= 5000)
            await swarm.grow(nodes, wave=wave)
            out["join_wall_s"] = round(time.perf_counter() - wall0, 1)
            out["join_virtual_s"] = round(trio.current_time(), 1)
            await swarm.settle(settle_rounds)
            out["settle_wall_s"] = round(time.perf_counter() - wall0 - out["join_wall_s"], 1)
            out["vivaldi_median_rel_error"] = round(vivaldi_error(swarm), 3)
            out.update(cluster_stats(swarm))

            # publish: per looker one in-region and one global key, each as clustered and plain
            alive = swarm.alive
            by_region: dict[str, list[DHTNode]] = {}
            for node in alive:
                by_region.setdefault(swarm.region_of[node.peer_id], []).append(node)
            lookers = [n for n in rng.sample(alive, min(lookups, len(alive))) if len(by_region[swarm.region_of[n.peer_id]]) > 1]
            jobs: list[tuple[DHTNode, dict[str, str]]] = []
            liar_jobs: list[tuple[DHTNode, dict[str, str]]] = []
            t0 = time.perf_counter()
            async with trio.open_nursery() as tmp:
                for i, looker in enumerate(lookers):
                    mates = [m for m in by_region[swarm.region_of[looker.peer_id]] if m is not looker]
                    for phase, phase_jobs in (("", jobs), ("liars/", liar_jobs)):
                        if phase and not liar_fraction:
                            continue
                        local_pub, global_pub = rng.choice(mates), rng.choice([m for m in alive if m is not looker])
                        keys = {kind: f"bench/{phase}{kind}/{i}" for kind in ("rc", "rp", "gc", "gp")}
                        tmp.start_soon(_publish, local_pub, keys["rc"], None)
                        tmp.start_soon(_publish, local_pub, keys["rp"], [0])
                        tmp.start_soon(_publish, global_pub, keys["gc"], None)
                        tmp.start_soon(_publish, global_pub, keys["gp"], [0])
                        phase_jobs.append((looker, keys))
            out["publish_wall_s"] = round(time.perf_counter() - t0, 1)

            # dead contacts: a few % crash silently, tables still list them
            for node in rng.sample(swarm.alive, int(dead_fraction * len(swarm.alive))):
                swarm.crash(node)
            t0 = time.perf_counter()
            tallies = await measure(swarm, jobs, churn_fraction, wave, rng)
            out["lookup_wall_s"] = round(time.perf_counter() - t0, 1)
            for name, tally in tallies.items():
                out[name] = tally.summary()
            if liar_fraction:
                looker_ids = {l.peer_id for l, _ in jobs}
                others = [n for n in swarm.alive if n.peer_id not in looker_ids]
                liars = rng.sample(others, min(len(others), round(liar_fraction * len(swarm.alive))))
                for liar in liars:
                    turn_liar(liar, black_holes(world, rng, 200))
                under = await measure(swarm, liar_jobs, churn_fraction, wave, rng)
                out["liars"] = len(liars)
                out["under_liars"] = {name: tally.summary() for name, tally in under.items()}
                out["liar_latency_ratio"] = {
                    name: round(u / h, 3) if (u := out["under_liars"][name]["latency_ms_median"]) and (h := out[name]["latency_ms_median"]) else None
                    for name in TALLIES}
            ci, pi = out["clustered_in_region"]["latency_ms_median"], out["plain_in_region"]["latency_ms_median"]
            cg, pg = out["clustered_global"]["latency_ms_median"], out["plain_global"]["latency_ms_median"]
            out["in_region_latency_ratio"] = round(ci / pi, 3) if ci and pi else None
            out["global_latency_ratio"] = round(cg / pg, 3) if cg and pg else None
            # medians of a two-humped distribution (one hop or two) move between runs; means are steadier
            cm, pm = out["clustered_in_region"]["latency_ms_mean"], out["plain_in_region"]["latency_ms_mean"]
            out["in_region_mean_latency_ratio"] = round(cm / pm, 3) if cm and pm else None
            out["sim_messages"] = world.total_messages
            nursery.cancel_scope.cancel()
    out["wall_s"] = round(time.perf_counter() - wall0, 1)
    return out


async def _publish(node: DHTNode, key: str, levels: list[int] | None) -> None:
    await node.store(key, {"by": node.peer_id[-8:]}, ttl=3600, levels=levels, republish=False)


def cluster_stats(swarm: Swarm) -> dict[str, Any]:
    """How regions map onto level-2 / level-1 clusters."""
    out: dict[str, Any] = {}
    alive = swarm.alive
    for level in sorted(swarm.config.cluster_thresholds, reverse=True):
        labels: dict[str, dict[str, int]] = {}
        for node in alive:
            labels.setdefault(swarm.region_of[node.peer_id], {}).setdefault(node.clusters[level], 0)
            labels[swarm.region_of[node.peer_id]][node.clusters[level]] += 1
        share = [max(c.values()) / sum(c.values()) for c in labels.values()]
        out[f"level{level}_clusters"] = len({node.clusters[level] for node in alive})
        out[f"level{level}_region_in_main_cluster"] = round(statistics.mean(share), 3)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--lookups", type=int, default=200, help="lookers (each does 4 lookups)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--dead", type=float, default=0.03, help="fraction of peers that crash silently before lookups")
    ap.add_argument("--churn", type=float, default=0.01, help="fraction replaced between each of 5 lookup batches")
    ap.add_argument("--settle-rounds", type=int, default=3)
    ap.add_argument("--wave", type=int, default=200, help="peers joining concurrently")
    ap.add_argument("--no-region-hints", action="store_true", help="peers start without a --region hint")
    ap.add_argument("--liars", type=float, default=0.0, metavar="FRACTION",
                    help="then this fraction of peers answers lookups with fake black-hole contacts, and the lookups run again")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = ap.parse_args(argv)
    if args.quick:
        args.nodes, args.lookups, args.wave, args.settle_rounds = 100, 10, 50, 1
    out = trio.run(lambda: run_bench(args.nodes, lookups=args.lookups, seed=args.seed, dead_fraction=args.dead,
                                     churn_fraction=args.churn, settle_rounds=args.settle_rounds, wave=args.wave,
                                     region_hints=not args.no_region_hints, liar_fraction=args.liars),
                   clock=trio.testing.MockClock(autojump_threshold=0))
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['nodes']} peers, wall {out['wall_s']} s (join {out['join_wall_s']} s); "
          f"Vivaldi median error {out['vivaldi_median_rel_error']:.1%}")
    for name in TALLIES:
        s = out[name]
        print(f"  {name:20s} median {s['latency_ms_median']} ms  p90 {s['latency_ms_p90']} ms  hops {s['hops_median']}"
              f"  msgs {s['messages_per_lookup']}  success {s['success_rate']}")
    print(f"  in-region clustered/plain {out['in_region_latency_ratio']}, global {out['global_latency_ratio']}")
    if "under_liars" in out:
        print(f"with {out['liars']} liars answering with fake black-hole contacts:")
        for name in TALLIES:
            s = out["under_liars"][name]
            print(f"  {name:20s} median {s['latency_ms_median']} ms  p90 {s['latency_ms_p90']} ms  hops {s['hops_median']}"
                  f"  msgs {s['messages_per_lookup']}  success {s['success_rate']}  ×{out['liar_latency_ratio'][name]} of honest")


if __name__ == "__main__":
    main(sys.argv[1:])
