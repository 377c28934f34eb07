"""A far user for bench.netns: one client process in a lab host's namespace, the restating prompt plain then speculative.

    python -m bench.netns_client --listen /ip4/IP/tcp/PORT --region ap --bootstrap ADDR --model FOLDER --tokens N

bench.pipeline's `bench_client` (its own identity, in-memory ledger, libp2p network and DHT node), so
the generations are timed where the user is, not through a control socket. Greedy, client-driven, no
spot checks (a check re-runs steps on the other region's replica: the figure is speculation's alone).
The same `DistributedModel` generates `RESTATE` (bench.pipeline) with `speculative=False`, then with
prompt lookup, each after a short warm-up of its own mode; prints one JSON object and exits.
"""

from __future__ import annotations

import argparse
import json
import sys


async def run(args: argparse.Namespace) -> dict:
    from bench.pipeline import bench_client, restating_runs

    async with bench_client(args.model, args.bootstrap, listen=args.listen, region=args.region or None,
                            spot_check=None) as model:
        await model.generate([1, 2, 3], max_new_tokens=2, stop_token_ids=[], speculative=False)  # dials, routes
        return await restating_runs(model, args.tokens)


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
