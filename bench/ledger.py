"""How fast the credit log signs, verifies and durably stores entries, and how fast one spreads.

`python -m bench.ledger --json` prints one JSON object:

- `sign_per_s`, `verify_per_s`: Ed25519 alone (pynacl), over entry headers; the baseline the rest is
  a ratio of.
- `own_append_durable_per_s`: `Ledger.append_sync` on disk — sign, check, one fsynced SQLite
  transaction per entry (what acknowledging each entry costs).
- `ingest_durable_per_entry_per_s`: verify + append of another peer's entries, one durable
  transaction per entry.
- `ingest_durable_batched_per_s`: the same, one durable transaction per pulled range of
  `--range` entries of one author.
- `ingest_durable_per_reply_per_s`: one durable transaction per pull reply (up to 64 ranges of
  different authors, as a catching-up peer gets them) — what replication does.
  Each ingest figure is given for `dispute` entries (one signature each) and for `earn` entries
  (two signatures: the entry's and the client's receipt, plus the FLOPs recomputation).
- `standing`: for swarms of `--standing-peers` peers (each the client of 10 random servers, one
  receipt each, written straight into an in-memory store: no signatures), how long one peer's
  `StandingView` takes to recompute (read its part of the work graph, compute its view): with the
  balance fold it reads the reliability factors from still to do (`recompute_s`) and done
  (`recompute_balances_known_s`); and, on the whole work graph built in memory, the build and one
  more viewer's standings.
- `sybils`: a swarm of `--sybil-peers` peers, 10 % of them Sybils in groups of `--sybil-group`
  keys, each of which signs for an hour of work (1,000 tokens/s) its group's first key never did,
  and which consume some honest work and
  do a little real work for honest clients; honest clients each use 3 honest servers (receipts
  written straight into a store, as above). Every honest peer computes its view: the most standing
  any Sybil (`max_sybil_standing`) and any group (`max_group_standing`) reaches in any honest view,
  against the work honest peers received from that group (`max_group_work_received`) — the bound —
  and the balance the farm shows in the shared fold (`max_group_farmed_balance`), the baseline.
  Figures in GFLOP-credits.
- `proofs`: what judging a dispute costs (pipeline/proofs.py, pipeline/disputes.py), on a tiny random
  Llama (hidden 64, 2 blocks) built in a temp dir: `signature_check_per_s` (one signed step, the
  check a forged record gets and all it gets) against `verify_per_s` above; `inputs_check_s` (hashing
  a proof's steps against the signed input digest); `replay_s` (a judge re-running a proof of
  `--proof-tokens` tokens over the span, KV cache included) against `forward_s`, the same steps run
  straight through the span in the same run; `signed_forward_s`, those steps with each signed by the
  server and checked by the client (what signing costs a session); and the proof's size.
- `sim`: on the simulator (`--nodes` peers, each dialling `--dials` others), the virtual seconds
  for one new entry to reach every peer's verified store, by gossip push + pull, against the ideal
  flood over the same connections (`bench.gossip_sim.ideal_flood`) in the same run.
Everything runs in this one process on one core (no worker threads).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import msgpack
import trio
import trio.testing

from credits import (
    CreditPolicy, IngestLimits, Ledger, LogEntry, ReceiptSigner, StandingView, Store, WorkGraph, linear_pricing, standings,
)
from credits.entry import ZERO_HASH, clear_signature_cache
from credits.ledger import GFLOP
from p2p.identity import Identity

PRICING = linear_pricing(lambda model: 1_000_000)
# Ingest figures measure verification and storage, not the allowance a peer gives one author's
# entries without a receipt (credits.allowance), which the dispute chains here would exhaust.
UNTHROTTLED = IngestLimits(burst_entries=1 << 30, burst_bytes=1 << 40)


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def make_chain(author: Identity, n: int, kind: str) -> list[bytes]:
    client = Identity.generate()
    signer = ReceiptSigner(client, server=author.public_key, model="m", start=0, end=4, pricing=PRICING)
    out, prev = [], ZERO_HASH
    for seq in range(1, n + 1):
        if seq == 1:
            body = msgpack.packb([author.public_key, 10**12, "start"])
            k = "grant"
        elif kind == "earn":
            body, k = msgpack.packb([signer.sign(seq * 3).to_list()]), "earn"
        else:
            body, k = msgpack.packb([client.public_key, f"reason {seq}", b""]), "dispute"
        e = LogEntry.create(author, seq, prev, 1_700_000_000_000 + seq, k, body)
        out.append(e.encode())
        prev = e.hash
    return out


def bench_crypto(n: int) -> dict:
    me = Identity.generate()
    headers = [LogEntry.create(me, 1, ZERO_HASH, i, "dispute", b"x").header for i in range(n)]
    t = time.perf_counter()
    sigs = [me.sign(h) for h in headers]
    sign = time.perf_counter() - t
    import nacl.signing

    key = nacl.signing.VerifyKey(me.public_key)
    t = time.perf_counter()
    for h, s in zip(headers, sigs):
        key.verify(h, s)
    verify = time.perf_counter() - t
    return {"sign_per_s": rate(n, sign), "verify_per_s": rate(n, verify)}


def bench_proofs(n: int, tokens: int) -> dict:
    """See the module docstring (`proofs`)."""
    import math
    import tempfile as tf
    from types import SimpleNamespace

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.disputes import DisputeJudge, ServedBlocks
    from pipeline.limiter import PriorityLimiter
    from pipeline.loading import load_span
    from pipeline.proofs import (
        DisputeProof, InputChain, ProvenLog, check_signed, result_digests, sign_step, tensor_digest,
    )

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=101, max_position_embeddings=max(64, 2 * tokens))
    with tf.TemporaryDirectory() as folder:
        LlamaForCausalLM(config).save_pretrained(folder)
        span = load_span(folder, 0, 2, dtype="float32", device="cpu")
    server, session, seed = Identity.generate(), b"i" * 16, b"s" * 16
    prefill = max(1, tokens // 2)
    steps = [(0, torch.randn(1, prefill, 64))] + [(p, torch.randn(1, 1, 64)) for p in range(prefill, tokens)]
    span.forward(steps[0][1], span.new_cache(tokens), 0)  # warm up

    def run(signed: bool) -> tuple[float, ProvenLog]:
        cache, chain, log = span.new_cache(tokens), InputChain(session), ProvenLog(session)
        t0 = time.perf_counter()
        for i, (pos, x) in enumerate(steps):
            out = span.forward(x, cache, pos)
            if signed:  # the server signs, the client checks and keeps the step
                output_digest, output_fingerprint = result_digests(out, seed)
                wire = sign_step(server, model="m", start=0, end=2, dtype="float32", session=session, step=i,
                                 pos=pos, chunks=[x.shape[1]],
                                 input_digest=chain.add(pos, [x.shape[1]], tensor_digest(x)),
                                 output_digest=output_digest, output_fingerprint=output_fingerprint,
                                 seed=seed).to_wire()
                log.accept(check_signed(wire, server=server.public_key, model="m", start=0, end=2, dtype="float32",
                                        session=session, step=i, seed=seed, outputs=out), pos, [x.shape[1]], x, out)
        return time.perf_counter() - t0, log

    async def in_worker(signed: bool) -> tuple[float, ProvenLog]:  # where servers and judges compute
        return await trio.to_thread.run_sync(run, signed)

    forward = min(trio.run(in_worker, False)[0] for _ in range(3))  # best of 3: the figures are ratios
    signed = min(trio.run(in_worker, True)[0] for _ in range(3))
    log = trio.run(in_worker, True)[1]
    proof = log.proof(len(log.steps) - 1)
    evidence = proof.encode()
    decoded = DisputeProof.decode(evidence, server.public_key, 64)
    t = time.perf_counter()
    for _ in range(n):
        decoded.record.valid()
    signature = time.perf_counter() - t
    t = time.perf_counter()
    assert decoded.inputs_match()
    inputs_check = time.perf_counter() - t
    blocks = ServedBlocks(SimpleNamespace(span=span, model_id="m", dtype_name="float32", limiter=PriorityLimiter(1)))
    judge = DisputeJudge(None, blocks)  # type: ignore[arg-type]  # judge() reads no ledger

    async def replay() -> tuple[bool | None, float]:
        t0 = time.perf_counter()
        verdict = await judge.judge(server.public_key, evidence)
        return verdict, time.perf_counter() - t0

    verdict, replay_s = min((trio.run(replay) for _ in range(3)), key=lambda r: r[1])
    assert verdict is False and not math.isnan(replay_s)  # an honest step: a false accusation
    return {"tokens": tokens, "steps": len(steps), "proof_bytes": len(evidence),
            "signature_check_per_s": rate(n, signature), "inputs_check_s": round(inputs_check, 6),
            "replay_s": round(replay_s, 4), "forward_s": round(forward, 4), "signed_forward_s": round(signed, 4),
            "replay_vs_forward": round(replay_s / forward, 2), "signed_vs_forward": round(signed / forward, 2)}


def bench_store(n: int, range_size: int, directory: str) -> dict:
    out: dict = {}
    # Own appends, durable, one transaction each.
    with tempfile.TemporaryDirectory(dir=directory) as d:
        led = Ledger(Identity.generate(), Store(d), pricing=PRICING, policy=CreditPolicy(starting_grant=10**12),
                         ingest_limits=UNTHROTTLED)
        led.append_sync("grant", msgpack.packb([led.me, 10**12, "start"]))
        other = Identity.generate().public_key
        t = time.perf_counter()
        for i in range(n):
            led.append_sync("dispute", msgpack.packb([other, f"r{i}", b""]))
        out["own_append_durable_per_s"] = rate(n, time.perf_counter() - t)
    for kind in ("dispute", "earn"):
        wires = make_chain(Identity.generate(), n, kind)
        clear_signature_cache()  # nothing here was verified before
        with tempfile.TemporaryDirectory(dir=directory) as d:
            led = Ledger(Identity.generate(), Store(d), pricing=PRICING, policy=CreditPolicy(starting_grant=10**12),
                         ingest_limits=UNTHROTTLED)
            t = time.perf_counter()
            for w in wires[: n // 4]:  # fsync-bound: a quarter is plenty to measure
                r = led.ingest_sync([w])
                assert r.stored == 1, r
            out[f"ingest_durable_per_entry_per_s_{kind}"] = rate(n // 4, time.perf_counter() - t)
        wires = make_chain(Identity.generate(), n, kind)
        clear_signature_cache()
        with tempfile.TemporaryDirectory(dir=directory) as d:
            led = Ledger(Identity.generate(), Store(d), pricing=PRICING, policy=CreditPolicy(starting_grant=10**12),
                         ingest_limits=UNTHROTTLED)
            t = time.perf_counter()
            for i in range(0, n, range_size):
                r = led.ingest_sync(wires[i:i + range_size])
                assert r.error is None, r
            out[f"ingest_durable_batched_per_s_{kind}"] = rate(n, time.perf_counter() - t)
            assert led.verify_chain(LogEntry.decode(wires[0]).author) == n
        # A catching-up peer: one pull reply of up to 64 ranges (here 32 authors x range entries) per transaction.
        authors = max(1, n // range_size)
        chains = [make_chain(Identity.generate(), range_size, kind) for _ in range(authors)]
        clear_signature_cache()
        with tempfile.TemporaryDirectory(dir=directory) as d:
            led = Ledger(Identity.generate(), Store(d), pricing=PRICING, policy=CreditPolicy(starting_grant=10**12),
                         ingest_limits=UNTHROTTLED)
            t = time.perf_counter()
            for i in range(0, authors, 64):
                rs = led.ingest_ranges_sync(chains[i:i + 64])
                assert all(r.error is None for r in rs)
            out[f"ingest_durable_per_reply_per_s_{kind}"] = rate(authors * range_size, time.perf_counter() - t)
    return out


def bench_standing(peers: int, servers_per_client: int = 10, seed: int = 0) -> dict:
    rng = random.Random(seed)
    viewer = Identity.generate()
    keys = [viewer.public_key] + [rng.randbytes(32) for _ in range(peers - 1)]
    led = Ledger(viewer, Store(None), pricing=PRICING)
    with led.store.transaction():
        for client in keys:
            for server in rng.sample(keys, servers_per_client + 1):
                if server != client:
                    led.store.insert_transfer(server, client, rng.randbytes(16), 1, 1, rng.randint(10**9, 10**12), "m")
    t = time.perf_counter()
    view = StandingView(led).standings_sync()
    recompute = time.perf_counter() - t  # with the balance fold (the reliability factors) to compute
    t = time.perf_counter()
    StandingView(led).standings_sync()
    recompute_warm = time.perf_counter() - t  # the fold already done for this ledger version
    transfers = led.store.counted_transfers()
    t = time.perf_counter()
    graph = WorkGraph.from_transfers(transfers)
    graph_s = time.perf_counter() - t
    t = time.perf_counter()
    standings(graph, keys[1])
    return {"peers": peers, "edges": graph.edges(), "with_standing": len(view),
            "recompute_s": round(recompute, 4), "recompute_balances_known_s": round(recompute_warm, 4),
            "whole_graph_s": round(graph_s, 4),
            "one_view_ms": round((time.perf_counter() - t) * 1000, 3)}


def bench_sybils(peers: int, group_size: int, sybil_share: float = 0.1, seed: int = 0) -> dict:
    rng = random.Random(seed)
    viewer = Identity.generate()  # owns the store; its own view is not among those measured
    keys = [rng.randbytes(32) for _ in range(peers)]
    n_sybils = int(peers * sybil_share)
    honest, sybils = keys[n_sybils:], keys[:n_sybils]
    groups = [sybils[i:i + group_size] for i in range(0, n_sybils, group_size)]
    hour = 3_600_000 * 30_000_000  # an hour at 1,000 tokens/s through 30 blocks of 1e6 FLOPs each
    led = Ledger(viewer, Store(None), pricing=PRICING)
    counter = iter(range(1, 1 << 62))

    def serve(server: bytes, client: bytes, flops: int) -> None:
        led.store.insert_transfer(server, client, rng.randbytes(16), 1, next(counter), flops, "m")

    with led.store.transaction():
        for client in honest:
            for server in rng.sample(honest, 3):
                if server != client:
                    serve(server, client, rng.randint(10**10, 10**11))
        for group in groups:
            for member in group:
                if member != group[0]:
                    serve(group[0], member, hour)  # the farm's "server" earns an hour from each of its keys
                serve(rng.choice(honest), member, rng.randint(10**10, 10**11))
            serve(group[0], rng.choice(honest), 3 * 10**10)
    t = time.perf_counter()
    graph = WorkGraph.from_transfers(led.store.counted_transfers())
    views = [standings(graph, h) for h in honest]
    views_s = time.perf_counter() - t
    balances = led.balances_sync()
    out = {"peers": peers, "sybils": n_sybils, "group": group_size, "honest_views": len(views),
           "views_s": round(views_s, 3), "max_sybil_standing": 0.0, "max_group_standing": 0.0,
           "max_group_work_received": 0.0, "max_group_farmed_balance": 0.0}
    for group in groups:
        members = set(group)
        received = sum(w for h in honest for s, w in graph.received.get(h, {}).items() if s in members)
        farmed = sum(max(0, balances[m].effective) for m in members if m in balances)
        reached = [sum(view.get(m, 0) for m in members) for view in views]
        out["max_sybil_standing"] = max(out["max_sybil_standing"],
                                        max(view.get(m, 0) for view in views for m in members) / GFLOP)
        out["max_group_standing"] = max(out["max_group_standing"], max(reached) / GFLOP)
        out["max_group_work_received"] = max(out["max_group_work_received"], received / GFLOP)
        out["max_group_farmed_balance"] = max(out["max_group_farmed_balance"], farmed / GFLOP)
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}


async def bench_sim(nodes: int, dials: int, seed: int) -> dict:
    from bench.gossip_sim import ideal_flood
    from credits.replication import Replicator
    from p2p.errors import P2PError
    from p2p.gossip import Gossip
    from p2p.sim import SimWorld

    rng = random.Random(seed)
    async with SimWorld.open(seed=seed) as world, trio.open_nursery() as nursery:
        ns = [world.add_node() for _ in range(nodes)]
        # a starting grant is the new entry spread below (open swarms grant 0: a private swarm's policy)
        policy = CreditPolicy(starting_grant=GFLOP)
        leds = [Ledger(n.identity, Store(None), pricing=PRICING, policy=policy, clock=n.now) for n in ns]
        gossips = [Gossip(n, n.identity, rng=random.Random(seed + i)) for i, n in enumerate(ns)]
        reps = [Replicator(led, n, g, exchange_interval=5.0, rng=random.Random(seed + i))
                for i, (led, n, g) in enumerate(zip(leds, ns, gossips))]

        async def dial(i: int, j: int) -> None:
            while ns[j].peer_id not in ns[i].connected_peers():
                try:
                    await ns[i].connect(ns[j].addr, timeout=2.0)
                except P2PError:
                    pass

        async with trio.open_nursery() as dials_:
            for i in range(nodes):
                for j in rng.sample(range(nodes), dials):
                    if i != j:
                        dials_.start_soon(dial, i, j)
        for g, r in zip(gossips, reps):
            await nursery.start(g.run)
            await nursery.start(r.run)
        await trio.sleep(10)  # first full exchanges settle
        times = []
        ideal = []
        for k in range(3):
            author = rng.randrange(nodes)
            t0 = trio.current_time()
            entry = await leds[author].claim_starting_grant()
            assert entry is not None  # a fresh ledger has its grant to claim
            ideal.append(ideal_flood(world, ns, author))
            while any(led.heads.get(entry.author) != (entry.seq, entry.hash) for led in leds):
                await trio.sleep(0.01)
            times.append(trio.current_time() - t0)
            await trio.sleep(2)
        nursery.cancel_scope.cancel()
    return {"nodes": nodes, "dials": dials,
            "entry_to_all_peers_s": [round(t, 3) for t in times],
            "ideal_flood_s": [round(t, 3) for t in ideal],
            "ratio_to_ideal": [round(t / i, 2) for t, i in zip(times, ideal)]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=4000)
    parser.add_argument("--range", type=int, default=128, help="entries per pulled range (one transaction)")
    parser.add_argument("--dir", default=None, help="where the durable stores go (default: a temp dir on the data disk)")
    parser.add_argument("--nodes", type=int, default=1000, help="simulated peers (0: skip the simulation)")
    parser.add_argument("--dials", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standing-peers", type=int, nargs="*", default=[1000, 10000],
                        help="swarm sizes to time standing on (none: skip)")
    parser.add_argument("--sybil-peers", type=int, default=1000, help="swarm size of the Sybil figure (0: skip)")
    parser.add_argument("--sybil-group", type=int, default=10, help="keys per Sybil group (at least 2)")
    parser.add_argument("--proof-tokens", type=int, default=40, help="tokens of the session a timed proof covers")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure (the test suite runs it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries, args.nodes, args.standing_peers, args.sybil_peers, args.proof_tokens = 300, 50, [100, 1000], 200, 16
    directory = args.dir or os.path.join(os.getcwd(), ".bench-ledger")
    os.makedirs(directory, exist_ok=True)
    result = {"entries": args.entries, "range": args.range, "sqlite": "WAL, synchronous=FULL", "cores": 1}
    result.update(bench_crypto(args.entries))
    result.update(bench_store(args.entries, args.range, directory))
    try:
        os.rmdir(directory)
    except OSError:
        pass
    result["per_reply_vs_verify_alone"] = round(result["ingest_durable_per_reply_per_s_dispute"] / result["verify_per_s"], 2)
    result["standing"] = [bench_standing(n, seed=args.seed) for n in args.standing_peers]
    if args.sybil_peers:
        result["sybils"] = bench_sybils(args.sybil_peers, args.sybil_group, seed=args.seed)
    result["proofs"] = bench_proofs(args.entries, args.proof_tokens)
    result["proofs"]["signature_check_vs_verify"] = round(result["proofs"]["signature_check_per_s"]
                                                          / result["verify_per_s"], 2)
    if args.nodes:
        result["sim"] = trio.run(bench_sim, args.nodes, args.dials, args.seed,
                                 clock=trio.testing.MockClock(autojump_threshold=0))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:45} {v}")


if __name__ == "__main__":
    main()
