"""How well `--blocks auto` keeps 2 replicas of every block, on a simulated swarm, against the
throughput-only rule it replaced, in the same run.

`python -m bench.placement --json` simulates volunteers of mixed memory joining one swarm one after
another: each runs the real `choose_span` (pipeline/routing.py) on the announcements of those before
it, with as many blocks as fit half its memory (the server's default budget); then rebalancing
rounds, every server in turn running the real `rebalance_span` as `BlockServer.rebalance_once` does,
until nobody moves. The baseline is the rule before it (`throughput_choose_span` /
`throughput_rebalance_span`: the window of least throughput; move when that raises the minimum) on
the same volunteers. Figures: the fraction of blocks with ≥ 2 replicas, against the best the
swarm's memory allows — `bound` = min(1, slots / (2 × blocks)), and `bound_covered` = min(1,
(slots − blocks) / blocks), the best while every block keeps a replica.

`spread`: on each rebalanced swarm (servers batching 8 steps at 4× their single-stream speed),
`--requests` concurrent requests of one peer routed one after another by the real `find_route`
(on the swarms without a gap),
each counted as a session at its servers as the client counts them (`SequenceManager.hold`);
baseline: the same routes chosen blind to load (as before #15/#17). Figures: the most sessions at
one server, and the mean and worst per-token time of the requests once all are running, as
`block_time` models it (hop overhead + blocks × block_time at each server's final load).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import replace
from typing import Callable

from pipeline.announce import ServerInfo
from pipeline.routing import (RoutingConfig, block_time, choose_span, coverage, find_route, rebalance_span, replicas,
                              swarm_quality)

# volunteers' accelerator memory (GiB) and decode tokens/s through one block, with their shares
HARDWARE = [(8, 15.0, 0.25), (12, 25.0, 0.20), (16, 30.0, 0.20), (24, 60.0, 0.20), (48, 90.0, 0.10), (80, 200.0, 0.05)]
THRESHOLD = 0.75  # ServerConfig.rebalance_threshold's default

ChooseSpan = Callable[[list[ServerInfo], int, int], tuple[int, int]]
RebalanceSpan = Callable[[list[ServerInfo], ServerInfo, int, float], tuple[int, int] | None]


def throughput_choose_span(servers: list[ServerInfo], num_blocks: int, k: int) -> tuple[int, int]:
    """The rule before replicas counted: the window of k blocks with the lowest minimum throughput, then total."""
    k = max(1, min(k, num_blocks))
    cov = coverage(servers, num_blocks)
    best = min(range(num_blocks - k + 1), key=lambda a: (min(cov[a:a + k]), sum(cov[a:a + k]), a))
    return best, best + k


def throughput_rebalance_span(others: list[ServerInfo], me: ServerInfo, num_blocks: int,
                              threshold: float) -> tuple[int, int] | None:
    """The rebalancing before replicas counted: when quality is below the threshold, move if that raises the minimum."""
    if swarm_quality(others + [me], num_blocks) >= threshold:
        return None
    a, b = throughput_choose_span(others, num_blocks, me.end - me.start)
    if (a, b) == (me.start, me.end):
        return None
    moved = replace(me, start=a, end=b)
    return (a, b) if min(coverage(others + [moved], num_blocks)) > min(coverage(others + [me], num_blocks)) else None


def volunteers(count: int, num_blocks: int, block_gib: float, rng: random.Random) -> list[tuple[int, float]]:
    """(blocks that fit, decode tokens/s) per volunteer, in joining order."""
    out = []
    for _ in range(count):
        mem, tps, _share = rng.choices(HARDWARE, weights=[h[2] for h in HARDWARE])[0]
        k = max(1, min(num_blocks, int(mem / 2 / block_gib)))
        out.append((k, tps * rng.uniform(0.7, 1.3)))
    return out


def figures(servers: list[ServerInfo], num_blocks: int) -> dict:
    reps = replicas(servers, num_blocks)
    return {"two_replicas": sum(r >= 2 for r in reps) / num_blocks, "covered": sum(r >= 1 for r in reps) / num_blocks,
            "min_replicas": min(reps)}


def simulate(joining: list[tuple[int, float]], num_blocks: int, choose: ChooseSpan, rebalance: RebalanceSpan,
             max_rounds: int) -> dict:
    servers: list[ServerInfo] = []
    for i, (k, tps) in enumerate(joining):
        a, b = choose(servers, num_blocks, k)
        servers.append(ServerInfo(peer_id=f"v{i}", start=a, end=b, decode_tps=tps, prefill_tps=tps * 10, cache_tokens=1000))
    joined = figures(servers, num_blocks)
    moves = rounds = 0
    for rounds in range(1, max_rounds + 1):
        moved = 0
        for i in range(len(servers)):
            target = rebalance(servers[:i] + servers[i + 1:], servers[i], num_blocks, THRESHOLD)
            if target is not None:
                servers[i] = replace(servers[i], start=target[0], end=target[1])
                moved += 1
        moves += moved
        if not moved:
            break
    return {"joined": joined, "rebalanced": {**figures(servers, num_blocks), "moves": moves, "rounds": rounds},
            "servers": servers}


def spread(servers: list[ServerInfo], num_blocks: int, requests: int, *, aware: bool) -> dict:
    """`requests` routes through the whole model, chosen one after another (load-aware: each counting
    the sessions of those before it); the sessions per server and the modelled per-token times."""
    batching = [replace(s, batch_decode_tps=4 * s.decode_tps, batch_size=8) for s in servers]
    cfg = RoutingConfig() if aware else RoutingConfig(session_spread=0.0)
    held: dict[str, int] = {}
    routes = []
    for _ in range(requests):
        route = find_route(batching, 0, num_blocks, config=cfg,
                           load=(lambda s: held.get(s.peer_id, 0)) if aware else (lambda s: 0))
        for hop in route:
            held[hop.peer_id] = held.get(hop.peer_id, 0) + 1
        routes.append(route)
    by_id = {s.peer_id: s for s in batching}
    times = [sum(cfg.hop_overhead + (h.end - h.start) * block_time(
        by_id[h.peer_id].decode_tps, by_id[h.peer_id].batch_decode_tps, by_id[h.peer_id].batch_size,
        held[h.peer_id] - 1) for h in route) for route in routes]
    return {"max_sessions": max(held.values()), "servers_used": len(held), "mean_token_s": statistics.fmean(times),
            "worst_token_s": max(times)}


def mean_of(runs: list[dict], stage: str, name: str) -> float:
    return statistics.fmean(float(run[stage][name]) for run in runs)


def run_size(count: int, args: argparse.Namespace) -> dict:
    n = args.blocks
    rules: dict[str, tuple[ChooseSpan, RebalanceSpan]] = {
        "before": (throughput_choose_span, throughput_rebalance_span),
        "after": (lambda s, n, k: choose_span(s, n, k), rebalance_span),
    }
    per_rule: dict[str, list[dict]] = {name: [] for name in rules}
    bounds, bounds_covered, slots = [], [], []
    for seed in range(args.seeds):
        joining = volunteers(count, n, args.block_gib, random.Random(f"{args.seed}/{count}/{seed}"))
        total = sum(k for k, _ in joining)
        slots.append(total / n)
        bounds.append(min(1.0, total / (2 * n)))
        bounds_covered.append(min(1.0, max(0, total - n) / n))
        for name, (choose, rebalance) in rules.items():
            per_rule[name].append(simulate(joining, n, choose, rebalance, args.rounds))
    bound, bound_covered = statistics.fmean(bounds), statistics.fmean(bounds_covered)
    out: dict = {"volunteers": count, "slots_per_block": round(statistics.fmean(slots), 3), "bound": round(bound, 4),
                 "bound_covered": round(bound_covered, 4)}
    for name, runs in per_rule.items():
        fig: dict = {}
        for stage in ("joined", "rebalanced"):
            two = mean_of(runs, stage, "two_replicas")
            fig[stage] = {"two_replicas": round(two, 4), "vs_bound": round(two / bound, 4) if bound else 1.0,
                          "vs_bound_covered": round(two / bound_covered, 4) if bound_covered else 1.0,
                          "covered": round(mean_of(runs, stage, "covered"), 4),
                          "min_replicas": round(mean_of(runs, stage, "min_replicas"), 4)}
        fig["rebalanced"]["moves_per_server"] = round(mean_of(runs, "rebalanced", "moves") / count, 4)
        out[name] = fig
    routable = [run["servers"] for run in per_rule["after"] if run["rebalanced"]["min_replicas"] >= 1]
    if routable:  # swarms with a gap route nothing
        by_load = {name: [spread(servers, n, args.requests, aware=name == "aware") for servers in routable]
                   for name in ("blind", "aware")}
        out["spread"] = {"requests": args.requests, "swarms": len(routable),
                         **{name: {k: round(statistics.fmean(r[k] for r in runs), 4) for k in
                                   ("max_sessions", "servers_used", "mean_token_s", "worst_token_s")}
                            for name, runs in by_load.items()}}
        out["spread"]["worst_over_blind"] = round(out["spread"]["aware"]["worst_token_s"]
                                                  / out["spread"]["blind"]["worst_token_s"], 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volunteers", type=int, nargs="+", default=[20, 30, 40, 50, 100, 200])
    parser.add_argument("--blocks", type=int, default=80, help="blocks of the model (80: a 70B llama)")
    parser.add_argument("--block-gib", type=float, default=1.75, help="memory of one block (70B llama in bf16)")
    parser.add_argument("--seeds", type=int, default=10, help="swarms per size, averaged")
    parser.add_argument("--rounds", type=int, default=5, help="rebalancing rounds at most (each server once a round)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests of one peer (`spread`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.volunteers, args.seeds, args.rounds = [20, 40], 2, 2
    result = {"blocks": args.blocks, "block_gib": args.block_gib, "seeds": args.seeds,
              "runs": [run_size(count, args) for count in args.volunteers]}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.blocks} blocks of {args.block_gib} GiB, {args.seeds} swarms per size; blocks with ≥ 2 replicas "
          "(after joining / after rebalancing), bound = what memory allows")
    for run in result["runs"]:
        b, a = run["before"], run["after"]
        print(f"{run['volunteers']:4d} volunteers, {run['slots_per_block']:.2f} slots/block, bound {run['bound']:.3f}: "
              f"before {b['joined']['two_replicas']:.3f} / {b['rebalanced']['two_replicas']:.3f}, "
              f"after {a['joined']['two_replicas']:.3f} / {a['rebalanced']['two_replicas']:.3f}")
        sp = run.get("spread")
        if sp is None:
            continue
        print(f"     {sp['requests']} concurrent requests, blind to load -> load-aware: servers used "
              f"{sp['blind']['servers_used']:.1f} -> {sp['aware']['servers_used']:.1f}, most sessions at one server "
              f"{sp['blind']['max_sessions']:.1f} -> {sp['aware']['max_sessions']:.1f}, worst per-token time "
              f"{sp['blind']['worst_token_s']:.3f} s -> {sp['aware']['worst_token_s']:.3f} s")


if __name__ == "__main__":
    main()
