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


async def run(args: argparse.Namespace) -> dict:
    import trio

    from credits import Ledger
    from dht.node import DHTNode
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from pipeline.billing import ClientBilling
    from pipeline.client import ClientConfig, DistributedModel
    from bench.pipeline import restating_runs
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
