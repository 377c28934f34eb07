"""How well volunteers given several models (`potluck serve --model A --model B --blocks auto`) spread
over them by demand, on a simulated swarm, against the best split and against choices blind to demand,
in the same run.

`python -m bench.model_demand --json` simulates volunteers of mixed memory (bench/placement.py's
hardware mix) joining one after another, each holding the weights of every model: a big model (A,
80 blocks of 1.75 GiB: a 70B llama) and a small one (B, 32 blocks of 0.5 GiB: an 8B) with skewed demand,
plus a third (C) nobody asks for. Each runs the real `choose_model` (pipeline/modelchoice.py) on the
swarm's announcements so far and the demand, then the real `choose_span` (pipeline/routing.py) for
as many blocks of the chosen model as fit half its memory.

Figure: the worst model's coverage per demand, min over asked-for models of copies(m) / share(m)
(copies = blocks × replicas, in whole models), against `bound` — the best any split of the same
volunteers can reach (the fractional split, an upper bound; for two models: volunteers sorted by how
much more of A than of B they hold, the split point where both models' copies per share meet).
Baselines on the same volunteers: `default` (every volunteer serves the first model: one `--model`),
`uniform` (a random candidate), `proportional` (a random candidate weighted by demand: what
volunteers reading the demand but not the coverage would do). `unwanted_chosen`: volunteers that
chose C.

`sybil`: the same demand, as the real `DemandBook` tallies it, when `sybils` fresh keys each gossip
the most a note may say for C: with the caps (each author capped, strangers pooled as one), and with
them off (every author counted in full); the figure is the volunteers who chose C.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics

import trio

from p2p.identity import Identity
from pipeline.announce import ServerInfo
from pipeline.demand import MAX_COUNT, DemandBook, DemandNote
from pipeline.modelchoice import Candidate, choose_model, copies
from pipeline.routing import choose_span

from .placement import HARDWARE

# model id → (blocks, GiB a block)
MODELS = {"A": (80, 1.75), "B": (32, 0.5), "C": (32, 0.5)}


def joining(count: int, rng: random.Random) -> list[float]:
    """Each volunteer's memory (GiB), in joining order."""
    return [float(rng.choices(HARDWARE, weights=[h[2] for h in HARDWARE])[0][0]) for _ in range(count)]


def blocks_that_fit(mem: float, model: str) -> int:
    n, gib = MODELS[model]
    return max(1, min(n, int(mem / 2 / gib)))


def worst_per_demand(swarm: dict[str, list[ServerInfo]], share: dict[str, float]) -> float:
    return min(copies(swarm[m], MODELS[m][0]) / s for m, s in share.items() if s > 0)


def place(volunteers: list[float], pick) -> tuple[dict[str, list[ServerInfo]], int]:
    """Volunteers join one by one; `pick(swarm)` names the model each serves. (swarm, volunteers on C)."""
    swarm: dict[str, list[ServerInfo]] = {m: [] for m in MODELS}
    for i, mem in enumerate(volunteers):
        model = pick(swarm)
        n = MODELS[model][0]
        a, b = choose_span(swarm[model], n, blocks_that_fit(mem, model))
        swarm[model].append(ServerInfo(f"v{i}", a, b, 10.0, 100.0, 1000))
    return swarm, len(swarm["C"])


def by_demand(demand: dict[str, int]):
    def pick(swarm: dict[str, list[ServerInfo]]) -> str:
        chosen = choose_model([Candidate(m, copies(swarm[m], MODELS[m][0])) for m in MODELS], demand)
        assert chosen is not None  # some model is asked for
        return chosen
    return pick


def bound(volunteers: list[float], share: dict[str, float]) -> float:
    """The best worst-model copies per share over fractional splits of the volunteers between A and B."""
    gain = [(blocks_that_fit(m, "A") / MODELS["A"][0], blocks_that_fit(m, "B") / MODELS["B"][0]) for m in volunteers]
    gain.sort(key=lambda g: g[0] / g[1], reverse=True)  # the most A for the B given up first
    best = 0.0
    for cut in range(len(gain) + 1):  # the first `cut` on A, the rest on B; then the one at the cut split
        a = sum(g[0] for g in gain[:cut])
        b = sum(g[1] for g in gain[cut:])
        best = max(best, min(a / share["A"], b / share["B"]))
        if cut < len(gain):
            ga, gb = gain[cut]
            # move fraction x of volunteer `cut` from B to A: (a + x·ga)/sA = (b − gb + (1 − x)·gb)/sB
            b_rest = b - gb
            x = (share["A"] * (b_rest + gb) - share["B"] * a) / (share["B"] * ga + share["A"] * gb)
            if 0 <= x <= 1:
                best = max(best, min((a + x * ga) / share["A"], (b_rest + (1 - x) * gb) / share["B"]))
    return best


async def tallied(share: dict[str, float], sybils: int, capped: bool) -> dict[str, int]:
    """Demand as a peer's `DemandBook` counts it: 20 requesters with standing asking A and B by `share`,
    plus `sybils` fresh keys each claiming the most a note may for C. `capped=False` switches the caps
    off: no per-author cap, and the Sybils counted as if they had standing (each in full)."""
    honest = [Identity.generate() for _ in range(20)]
    sybil_keys = [Identity.generate() for _ in range(sybils)]
    standing = {i.public_key: 1 for i in honest + ([] if capped else sybil_keys)}

    async def standings():
        return standing

    book = DemandBook(Identity.generate().peer_id, standings, lambda: 0.0,
                      per_author=64 if capped else MAX_COUNT, max_trusted=4096)
    for i, ident in enumerate(honest):
        await book.hear(ident.peer_id, DemandNote(600.0, {"A" if i < round(20 * share["A"]) else "B": 64}), 0.0)
    for ident in sybil_keys:
        await book.hear(ident.peer_id, DemandNote(600.0, {"C": MAX_COUNT}), 0.0)
    return await book.demand()


def run_size(count: int, skew: float, args: argparse.Namespace) -> dict:
    share = {"A": skew, "B": 1.0 - skew, "C": 0.0}
    demand = {m: round(1000 * s) for m, s in share.items()}
    rules = {
        "demand": lambda rng: by_demand(demand),
        "default": lambda rng: (lambda swarm: "A"),
        "uniform": lambda rng: (lambda swarm: rng.choice(list(MODELS))),
        "proportional": lambda rng: (lambda swarm: rng.choices(list(MODELS), weights=[share[m] for m in MODELS])[0]),
    }
    worst: dict[str, list[float]] = {name: [] for name in rules}
    unwanted: dict[str, list[int]] = {name: [] for name in rules}
    bounds = []
    for seed in range(args.seeds):
        volunteers = joining(count, random.Random(f"{args.seed}/{count}/{skew}/{seed}"))
        bounds.append(bound(volunteers, share))
        for name, rule in rules.items():
            swarm, on_c = place(volunteers, rule(random.Random(f"{args.seed}/{name}/{seed}")))
            worst[name].append(worst_per_demand(swarm, share))
            unwanted[name].append(on_c)
    b = statistics.fmean(bounds)
    out: dict = {"volunteers": count, "share_A": skew, "bound": round(b, 4)}
    for name in rules:
        w = statistics.fmean(worst[name])
        out[name] = {"worst_copies_per_share": round(w, 4), "vs_bound": round(w / b, 4) if b else 1.0,
                     "unwanted_chosen": statistics.fmean(unwanted[name])}
    return out


def sybil_run(count: int, skew: float, args: argparse.Namespace) -> dict:
    share = {"A": skew, "B": 1.0 - skew, "C": 0.0}
    volunteers = joining(count, random.Random(f"{args.seed}/sybil"))
    out: dict = {"volunteers": count, "sybils": args.sybils}
    for name, capped in (("capped", True), ("uncapped", False)):
        demand = trio.run(tallied, share, args.sybils, capped)
        _, on_c = place(volunteers, by_demand(demand))
        out[name] = {"demand": demand, "volunteers_on_C": on_c}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volunteers", type=int, nargs="+", default=[10, 20, 40, 100])
    parser.add_argument("--skews", type=float, nargs="+", default=[0.5, 0.8, 0.95], help="A's share of demand")
    parser.add_argument("--seeds", type=int, default=10, help="swarms per size, averaged")
    parser.add_argument("--sybils", type=int, default=100, help="fresh keys gossiping demand for C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.volunteers, args.skews, args.seeds, args.sybils = [20, 40], [0.8], 2, 20
    result = {"models": {m: {"blocks": n, "block_gib": g} for m, (n, g) in MODELS.items()}, "seeds": args.seeds,
              "runs": [run_size(count, skew, args) for count in args.volunteers for skew in args.skews],
              "sybil": sybil_run(args.volunteers[-1], args.skews[-1], args)}
    if args.json:
        print(json.dumps(result))
        return
    print("worst model's copies per demand share, as a fraction of the best split (bound)")
    for run in result["runs"]:
        print(f"{run['volunteers']:4d} volunteers, A's share {run['share_A']:.2f}, bound {run['bound']:.2f}: "
              + ", ".join(f"{name} {run[name]['vs_bound']:.3f}" for name in ("demand", "proportional", "uniform",
                                                                              "default")))
    s = result["sybil"]
    print(f"{s['sybils']} Sybil keys asking for C: volunteers on C {s['capped']['volunteers_on_C']} with the caps, "
          f"{s['uncapped']['volunteers_on_C']} without")


if __name__ == "__main__":
    main()
