"""A far user for bench.netns: one client process in a lab host's namespace, the restating prompt plain then speculative.

    python -m bench.netns_client --listen /ip4/IP/tcp/PORT --region ap --bootstrap ADDR --model FOLDER --tokens N

Its own identity, in-memory ledger, `Libp2pNetwork` and client-mode `DHTNode` (like bench.pipeline's
client), so the generations are timed where the user is, not through a control socket. Greedy, client-driven,
no spot checks (a check re-runs steps on the other region's replica: the figure is speculation's alone).
The same `DistributedModel` generates `RESTATE` (bench.pipeline) with `speculative=False`, then with prompt
lookup, each after a short warm-up of its own mode; prints one JSON object and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


async def restating_runs(model, n: int) -> dict:
    """The restating prompt plain, then with prompt lookup: tok/s, passes, the time of a pass and where it goes."""
    from bench.pipeline import RESTATE

    ids = model.encode(RESTATE)
    out: dict = {"prompt_tokens": len(ids), "tokens": n}
    tokens = {}
    for name, speculative in (("plain", False), ("prompt_lookup", True)):
        await model.generate(ids, max_new_tokens=2, stop_token_ids=[], speculative=speculative)
        t0 = time.perf_counter()
        g = await model.generate(ids, max_new_tokens=n, stop_token_ids=[], speculative=speculative)
        wall = time.perf_counter() - t0
        passes = max(1, g.steps - 1)  # the prefill is the first step
        out[name] = {
            "tokens_per_s": n / wall, "decode_tokens_per_s": g.tokens_per_s, "wall_s": wall, "ttft_s": g.ttft_s,
            "passes": g.steps - 1, "tokens_per_pass": (n - 1) / passes,
            "ms_per_pass": 1000 * g.decode_s / passes,
            # per step, the prefill included: what the servers computed vs the rest of the step's wall time
            "server_compute_ms_per_step": 1000 * g.compute_s / max(1, g.steps),
            "network_ms_per_step": 1000 * g.network_s / max(1, g.steps),
            "route": [{"peer_id": p, "start": a, "end": b} for p, a, b in g.route],
        }
        if g.speculation is not None:
            out[name]["acceptance"] = g.speculation.acceptance
            out[name]["drafted"] = g.speculation.drafted
        tokens[name] = g.token_ids
    out["identical"] = tokens["plain"] == tokens["prompt_lookup"]
    out["speculative_over_plain"] = out["prompt_lookup"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


async def run(args: argparse.Namespace) -> dict:
    import trio

    from credits import Ledger
    from dht.node import DHTNode
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from pipeline.billing import ClientBilling
    from pipeline.client import ClientConfig, DistributedModel
    from pipeline.pricing import ModelPricing

    identity = Identity.generate()
    ledger = Ledger.open(identity, pricing=ModelPricing())  # in memory; servers bill every step
    async with Libp2pNetwork.open(identity, [args.listen]) as net:
        dht = DHTNode(net, bootstrap=args.bootstrap, client_mode=True, region=args.region or None)
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.run)
            config = ClientConfig(billing=ClientBilling(ledger), spot_check=None)
            model = await DistributedModel.from_pretrained(args.model, net, dht, config=config)
            await model.generate([1, 2, 3], max_new_tokens=2, stop_token_ids=[], speculative=False)  # dials, routes
            out = await restating_runs(model, args.tokens)
            nursery.cancel_scope.cancel()
    return out


def main(argv: list[str] | None = None) -> int:
    import trio

    p = argparse.ArgumentParser(prog="python -m bench.netns_client", description=__doc__.split("\n")[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--bootstrap", action="append", required=True)
    p.add_argument("--region", default="")
    p.add_argument("--model", required=True, help="the model's folder (the client loads its head)")
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)
    print(json.dumps(trio.run(run, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
