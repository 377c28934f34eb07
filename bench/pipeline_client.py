"""One user of bench.pipeline's concurrency figures: a client process of its own, generating on command.

    python -m bench.pipeline_client --bootstrap ADDR --model FOLDER --model-id ID --ids JSON --tokens N

bench.pipeline's `bench_client` (its own identity, in-memory ledger, libp2p network and DHT node), in a
process of its own as each user of a swarm is on a machine of their own: the clients' heads (embedding,
LM head, sampling) run side by side instead of one after another under one interpreter lock. After a
warm-up (dials, routes) it prints `{"ready": true}`; then for each line `go` on stdin it generates
`--tokens` greedy tokens (push, no speculation: batching alone) and prints one JSON object: its wall
time and the generation's split. It exits at the end of stdin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


async def run(args: argparse.Namespace) -> None:
    import torch
    import trio

    from bench.pipeline import bench_client

    torch.set_num_threads(args.threads)
    ids = json.loads(args.ids)
    async with bench_client(args.model, [args.bootstrap], model_id=args.model_id, push=True) as model:
        await model.generate(ids, max_new_tokens=2, stop_token_ids=[], speculative=False)  # dials, routes
        print(json.dumps({"ready": True}), flush=True)
        while (await trio.to_thread.run_sync(sys.stdin.readline)).strip() == "go":
            t0 = time.perf_counter()
            g = await model.generate(ids, max_new_tokens=args.tokens, stop_token_ids=[], speculative=False)
            print(json.dumps({"wall_s": time.perf_counter() - t0, "generation_wall_s": g.wall_s,
                              "compute_s": g.compute_s, "network_s": g.network_s,
                              "token_ids": g.token_ids}), flush=True)


def main(argv: list[str] | None = None) -> int:
    import trio

    p = argparse.ArgumentParser(prog="python -m bench.pipeline_client", description=__doc__.split("\n")[0])
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--model", required=True, help="the model's folder (the client loads its head)")
    p.add_argument("--model-id", required=True)
    p.add_argument("--ids", required=True, help="the prompt's token ids, a JSON list")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    trio.run(run, p.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
