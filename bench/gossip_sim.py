"""How fast and how costly gossip is on the simulator, against an ideal flood in the same run.

`python -m bench.gossip_sim --nodes 1000 --json` builds a swarm where each peer dials `--dials`
random others, then, for each loss rate, broadcasts `--messages` messages one after another from
random authors and records when each peer gets each one (virtual time). The baseline is the ideal
flood over the same connections: every peer forwards instantly to all its neighbours and nothing
is lost, so a message reaches a peer after the shortest-path sum of one-way delays.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time

import trio
import trio.testing

from p2p.errors import RequestTimeout
from p2p.gossip import Gossip
from p2p.sim import SimWorld

TOPIC = "bench"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ideal_flood(world: SimWorld, nodes, source: int) -> float:
    """Seconds until the last peer hears from `source` by shortest paths of base one-way delays."""
    index = {node.peer_id: i for i, node in enumerate(nodes)}
    best = [float("inf")] * len(nodes)
    best[source] = 0.0
    queue = [(0.0, source)]
    while queue:
        t, i = heapq.heappop(queue)
        if t > best[i]:
            continue
        for peer in nodes[i].connected_peers():
            j = index[peer]
            arrival = t + world.rtt(nodes[i].peer_id, peer) / 2
            if arrival < best[j]:
                best[j] = arrival
                heapq.heappush(queue, (arrival, j))
    return max(best)


async def run_one(args: argparse.Namespace, loss: float) -> dict:
    rng = random.Random(args.seed)
    async with SimWorld.open(seed=args.seed) as world, trio.open_nursery() as nursery:
        nodes = [world.add_node() for _ in range(args.nodes)]
        gossips = [Gossip(node, node.identity, fanout=args.fanout, pull_interval=args.pull_interval,
                          rng=random.Random(args.seed + i)) for i, node in enumerate(nodes)]
        arrivals: dict[bytes, list[float]] = {}
        for gossip in gossips:
            gossip.subscribe(TOPIC, lambda m: arrivals.setdefault(m.id, []).append(trio.current_time()))

        async def dial(i: int, j: int) -> None:
            while True:
                try:
                    await nodes[i].connect(nodes[j].addr)
                    return
                except RequestTimeout:
                    pass

        async with trio.open_nursery() as dials:
            for i in range(args.nodes):
                for j in rng.sample(range(args.nodes), args.dials):
                    if j != i:
                        dials.start_soon(dial, i, j)
        for gossip in gossips:
            await nursery.start(gossip.run)
        world.loss = loss
        began = trio.current_time()
        pulls_before = sum(g.stats.pulls_sent for g in gossips)

        reach_all, latencies, ideal, pushes, messages, pulled = [], [], [], 0, 0, 0
        for _ in range(args.messages):
            author = rng.randrange(args.nodes)
            pushes_before = sum(g.stats.pushes_sent for g in gossips)
            pulled_before = sum(g.stats.pulled for g in gossips)
            messages_before = world.total_messages
            start = trio.current_time()
            message_id = await gossips[author].publish(TOPIC, b"x" * args.size)
            with trio.move_on_after(args.limit):
                while len(arrivals[message_id]) < args.nodes:
                    await trio.sleep(0.01)
            got = arrivals[message_id]
            if len(got) < args.nodes:
                raise SystemExit(f"only {len(got)} of {args.nodes} peers got a message within {args.limit} s")
            reach_all.append(max(got) - start)
            latencies += [t - start for t in got]
            ideal.append(ideal_flood(world, nodes, author))
            await trio.sleep(args.settle)  # let stragglers' pushes finish before the next message
            pushes += sum(g.stats.pushes_sent for g in gossips) - pushes_before
            pulled += sum(g.stats.pulled for g in gossips) - pulled_before
            messages += world.total_messages - messages_before
        elapsed = trio.current_time() - began
        pull_rounds = sum(g.stats.pulls_sent for g in gossips) - pulls_before
        nursery.cancel_scope.cancel()

    ms = lambda seconds: round(seconds * 1000, 1)  # noqa: E731
    broadcasts = args.messages * args.nodes
    return {
        "loss": loss,
        "reach_all_ms": {"median": ms(statistics.median(reach_all)), "p90": ms(quantile(reach_all, 0.9)),
                         "max": ms(max(reach_all))},
        "per_peer_ms": {"median": ms(statistics.median(latencies)), "p90": ms(quantile(latencies, 0.9))},
        "ideal_flood_reach_all_ms": ms(statistics.median(ideal)),
        "reach_all_vs_ideal": round(statistics.median(reach_all) / statistics.median(ideal), 2),
        "pushes_per_peer_per_broadcast": round(pushes / broadcasts, 2),
        "network_messages_per_peer_per_broadcast": round(messages / broadcasts, 2),
        "delivered_by_pull": round(pulled / broadcasts, 4),
        "pull_rounds_per_peer_per_s": round(pull_rounds / args.nodes / elapsed, 2),
    }


async def main_async(args: argparse.Namespace) -> dict:
    wall = time.perf_counter()
    results = [await run_one(args, loss) for loss in args.loss]
    return {
        "bench": "gossip_sim",
        "nodes": args.nodes,
        "dials_per_peer": args.dials,
        "fanout": args.fanout,
        "messages": args.messages,
        "pull_interval_s": args.pull_interval,
        "runs": results,
        "wall_s": round(time.perf_counter() - wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--dials", type=int, default=4, help="random peers each peer dials (mean degree ≈ 2×)")
    parser.add_argument("--fanout", type=int, default=6)
    parser.add_argument("--messages", type=int, default=10)
    parser.add_argument("--size", type=int, default=256, help="payload bytes")
    parser.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--pull-interval", type=float, default=1.0)
    parser.add_argument("--settle", type=float, default=2.0, help="virtual seconds between messages")
    parser.add_argument("--limit", type=float, default=120.0, help="virtual seconds a message may take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.messages = 100, 3
    result = trio.run(main_async, args, clock=trio.testing.MockClock(autojump_threshold=0))
    if args.json:
        print(json.dumps(result))
        return
    print(f"gossip over {args.nodes} simulated peers, fanout {args.fanout}, {args.messages} messages per run")
    for run in result["runs"]:
        r, p = run["reach_all_ms"], run["per_peer_ms"]
        print(f"  loss {run['loss']:.0%}: all peers in {r['median']} ms median / {r['p90']} p90 / {r['max']} max"
              f" ({run['reach_all_vs_ideal']}× the ideal flood's {run['ideal_flood_reach_all_ms']} ms);"
              f" a peer in {p['median']} ms median; {run['pushes_per_peer_per_broadcast']} pushes per peer"
              f" per message; {run['delivered_by_pull']:.1%} delivered by pull")
    print(f"  wall time {result['wall_s']} s")


if __name__ == "__main__":
    main()
