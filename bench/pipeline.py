"""Swarm vs local generation, SmolLM2-135M-Instruct fp32 greedy: `python -m bench.pipeline [--json]`.

In one run, on this machine:
- local: transformers' own `generate` (single process, greedy, `--new-tokens` tokens), and our
  LocalModel (same block math as the servers, one process) — the baselines;
- swarm: `--servers` real server processes (`potluck serve --blocks`, each its own Libp2pNetwork
  + DHTNode on 127.0.0.1, blocks split evenly) and a client in this process that finds them through
  the DHT; client-driven (each hop's output comes back to the client) and with server-to-server
  forwarding (`push`).
- concurrency (continuous batching): `--clients` clients, each a process of its own (bench.pipeline_client:
  its own identity, ledger, libp2p network and head, as each user has a machine of their own), generate
  at once through the same servers: aggregate tok/s over the same clients' single-stream tok/s
  (`aggregate_over_single`; push mode), per-client tok/s, the servers' batch sizes, and where the
  machine's CPU time went per token (`cpu_ms_per_token`: each server, all clients, and the wall time
  times the cores: what there was); then again on servers started with `--max-batch 1` (batching off,
  skipped by --quick); and in process, decode tok/s of one server's span for batch 1/2/4/8 (the
  batching gain without any network, `forward_by_batch`).
Reported: tokens/s (new tokens / wall time of the whole generation, prefill included), swarm/local
ratios, time to first token, per-token time split into server compute, network (+ serialisation,
thread hops) and the client's own head (embed, final norm, LM head, sampling), the per-token per-hop
overhead (a step's wall less the servers' compute, per token, per server on the route; direct and push)
against bench.hop's round trip of one decode step's hidden state on the same machine in the same run
(`per_hop_overhead`), whether the swarm's
tokens equal HF's, and peak RSS of each server process against a process holding the full model.

Speculative decoding (`speculative`): on a prompt that restates given text (`RESTATE`), the same
swarm (client-driven) with prompt lookup vs without — `speculative_over_plain` (tok/s ratio), tokens
per pass, acceptance, identical output — and the same pair locally with transformers'
`prompt_lookup_num_tokens` as the fair local baseline (`local_hf_prompt_lookup`).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, cast

import torch
import trio

from potluck.localswarm import PeerProcess, wait_until

if TYPE_CHECKING:
    from pipeline.client import DistributedModel

PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper who befriends a whale."}]
RESTATE = [{"role": "user", "content": (
    "Copy this paragraph exactly, word for word:\n\nThe lighthouse stood on a rock at the edge of the bay. Every "
    "night the keeper climbed the one hundred and twelve steps, trimmed the wick, wound the clockwork and "
    "watched the beam sweep across the water. Ships passed far out, their lights small and steady, and the "
    "keeper wrote each one in the log: the hour, the heading, the weather and the state of the sea.")}]


def rss_of(pid: int) -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def local_baselines(folder: Path, ids: list[int], n: int) -> dict:
    from transformers import AutoModelForCausalLM

    from pipeline.loading import load_local_model

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        wall = time.perf_counter() - t0
    tokens = out[0, len(ids):].tolist()
    ours = load_local_model(folder, device="cpu")
    ours.generate_greedy(ids, 4)
    t0 = time.perf_counter()
    ours_tokens = ours.generate_greedy(ids, n)
    ours_wall = time.perf_counter() - t0
    return {"hf": {"tokens_per_s": n / wall, "ttft_s": ttft, "wall_s": wall},
            "ours_local": {"tokens_per_s": n / ours_wall, "wall_s": ours_wall, "tokens_match_hf": ours_tokens == tokens},
            "tokens": tokens}


def local_speculative(folder: Path, ids: list[int], n: int, lookup: int = 8) -> dict:
    """transformers' generate on the restating prompt, greedy, without and with `prompt_lookup_num_tokens`."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out: dict = {}
    with torch.inference_mode():
        for name, extra in (("plain", {}), ("prompt_lookup", {"prompt_lookup_num_tokens": lookup})):
            kw = dict(do_sample=False, pad_token_id=0, **extra)
            hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
            t0 = time.perf_counter()
            tokens = hf.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)[0, len(ids):].tolist()
            wall = time.perf_counter() - t0
            out[name] = {"tokens_per_s": n / wall, "wall_s": wall, "tokens": tokens}
    out["prompt_lookup_over_plain"] = out["prompt_lookup"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    out["identical"] = out["prompt_lookup"].pop("tokens") == out["plain"].pop("tokens")
    return out


async def restating_runs(model, n: int) -> dict:
    """The restating prompt through the swarm, plain then with prompt lookup, each after a short warm-up of its own
    mode: tok/s, passes, the time of a pass and where it goes, and whether the tokens are identical."""
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


def start_servers(folder: Path, k: int, num_layers: int, threads: int, root: Path,
                  *extra: str) -> list[tuple[PeerProcess, dict]]:
    """`k` real `potluck serve` processes splitting the model's blocks; returns each with its server status."""
    cuts = [round(i * num_layers / k) for i in range(k + 1)]
    procs: list[PeerProcess] = []
    for i in range(k):
        boot = ["--bootstrap", procs[0].addr] if procs else []
        procs.append(PeerProcess(root / f"server{i}", "--model", str(folder), "--blocks", f"{cuts[i]}:{cuts[i + 1]}",
                                 "--threads", str(threads), *boot, *extra).start(timeout=180))
    wait_until(lambda: all((p.status().get("server") or {}).get("throughput") for p in procs), 180,
               message="servers to measure and announce")
    return [(p, p.status()["server"]) for p in procs]


async def transport_round_trip(size: int) -> dict:
    """bench.hop's round trip of a `size`-byte request (a decode step's hidden state) over our libp2p
    backend and over raw TCP, in this process: what a hop's messages cost the transport alone."""
    from bench.hop import measure, summarize

    m = await measure(argparse.Namespace(size=size, rounds=200, warmup=20, mib=1, bulk_repeats=1))
    return {"request_bytes": size, "libp2p": summarize(m["libp2p"]["rtt"]), "tcp": summarize(m["tcp"]["rtt"])}


@asynccontextmanager
async def bench_client(folder: Path, bootstrap: list[str], *, listen: str = "/ip4/127.0.0.1/tcp/0",
                       region: str | None = None, model_id: str | None = None,
                       **config: Any) -> AsyncIterator[DistributedModel]:
    """A user's client as the benches run one (here, in bench.pipeline_client and bench.netns_client): its
    own identity, an in-memory ledger (servers started by `potluck serve` bill every step, so the client
    signs receipts like a peer does), libp2p network and client-mode DHT node; `config` sets the rest of
    its ClientConfig. Yields the model, found through the DHT."""
    from credits import Ledger
    from dht.node import DHTNode
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from pipeline.billing import ClientBilling
    from pipeline.client import ClientConfig, DistributedModel
    from pipeline.pricing import ModelPricing

    identity = Identity.generate()
    ledger = Ledger.open(identity, pricing=ModelPricing())
    async with Libp2pNetwork.open(identity, [listen]) as net:
        dht = DHTNode(net, bootstrap=bootstrap, client_mode=True, region=region)
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.run)
            yield await DistributedModel.from_pretrained(folder, net, dht, model_id=model_id,
                                                         config=ClientConfig(billing=ClientBilling(ledger), **config))
            nursery.cancel_scope.cancel()


async def swarm_runs(folder: Path, mid: str, bootstrap: str, ids: list[int], n: int, expect: list[int]) -> dict:
    results = {}
    async with bench_client(folder, [bootstrap], model_id=mid) as model:
        await model.generate(ids, max_new_tokens=4, stop_token_ids=[])  # warm-up: dials, routes
        for mode in ("direct", "push"):
            model.client_config.push = mode == "push"
            # plain decoding, like the local baseline (speculation has its own figures below)
            await model.generate(ids, max_new_tokens=2, stop_token_ids=[], speculative=False)
            t0 = time.perf_counter()
            g = await model.generate(ids, max_new_tokens=n, stop_token_ids=[], speculative=False)
            wall = time.perf_counter() - t0
            client_s = max(0.0, g.wall_s - g.compute_s - g.network_s)
            results[mode] = {
                "tokens_per_s": n / wall, "decode_tokens_per_s": g.tokens_per_s, "ttft_s": g.ttft_s,
                "wall_s": wall, "tokens_match_local": g.token_ids == expect,
                "per_token_ms": {"total": 1000 * g.wall_s / n, "server_compute": 1000 * g.compute_s / n,
                                 "network_and_overhead": 1000 * g.network_s / n,
                                 "client_head": 1000 * client_s / n},
                "route": [[p[-8:], a, b] for p, a, b in g.route], "push_fallbacks": g.push_fallbacks,
            }
            # what a hop costs beyond its compute: the steps' wall less the servers' compute (the client's
            # head left out: it is paid once a token, not per hop), per token, per server on the route
            results[mode]["per_hop_overhead_ms"] = 1000 * g.network_s / n / max(1, len(g.route))
        results["transport"] = await transport_round_trip(4 * model.model_config.hidden_size)
        model.client_config.push = False  # client-driven: speculation's figure alone
        results["speculative"] = await restating_runs(model, n)
    return results


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) a process has used so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def concurrent_runs(folder: Path, mid: str, bootstrap: str, ids: list[int], n: int, clients: int, threads: int,
                    server_pids: list[int], expect: list[int]) -> dict:
    """`clients` client processes (bench.pipeline_client) through the same servers: client 0 alone first
    (single stream), then all at once. A process each, as users are on machines of their own: their heads
    run side by side, not in turn under one interpreter lock."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    cmd = [sys.executable, "-m", "bench.pipeline_client", "--bootstrap", bootstrap, "--model", str(folder),
           "--model-id", mid, "--ids", json.dumps(ids), "--tokens", str(n), "--threads", str(threads)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(clients)]
    pool = ThreadPoolExecutor(clients)

    def answers(group: list[subprocess.Popen], timeout: float) -> list[dict]:
        lines = [pool.submit(p.stdout.readline) for p in group if p.stdout is not None]
        out = []
        for p, line in zip(group, lines):
            text = line.result(timeout=timeout)
            if not text:
                raise RuntimeError(f"a bench client exited ({p.poll()}) before answering")
            out.append(json.loads(text))
        return out

    def go(group: list[subprocess.Popen]) -> None:
        for p in group:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()

    try:
        answers(procs, 300)  # each warmed up: dials, routes
        go(procs[:1])
        single = answers(procs[:1], 300)[0]
        cpu0 = [cpu_seconds(pid) for pid in server_pids], [cpu_seconds(p.pid) for p in procs]
        t0 = time.perf_counter()
        go(procs)
        results = answers(procs, 600)
        wall = time.perf_counter() - t0
        cpu1 = [cpu_seconds(pid) for pid in server_pids], [cpu_seconds(p.pid) for p in procs]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        pool.shutdown()
    per_client = [n / r["wall_s"] for r in results]
    split = {"server_compute": sum(r["compute_s"] for r in results) / (clients * n) * 1000,
             "network_and_overhead": sum(r["network_s"] for r in results) / (clients * n) * 1000,
             "wall": sum(r["generation_wall_s"] for r in results) / (clients * n) * 1000}
    split["client_head_and_waiting"] = max(0.0, split["wall"] - split["server_compute"] - split["network_and_overhead"])
    single_tps = n / single["wall_s"]
    return {"clients": clients, "client_processes": True, "single_stream_tokens_per_s": single_tps,
            "aggregate_tokens_per_s": clients * n / wall, "aggregate_over_single": clients * n / wall / single_tps,
            "per_client_tokens_per_s": {"min": min(per_client), "mean": sum(per_client) / clients, "max": max(per_client)},
            "per_token_ms_per_client": split,
            # where the machine's CPU time went while all generated, per token generated (all clients' tokens)
            "cpu_ms_per_token": {"servers": [round(1000 * (b - a) / (clients * n), 2) for a, b in zip(cpu0[0], cpu1[0])],
                                 "clients": round(1000 * sum(b - a for a, b in zip(cpu0[1], cpu1[1])) / (clients * n), 2),
                                 "wall_over_cores": round(1000 * wall * (os.cpu_count() or 1) / (clients * n), 2)},
            "tokens_match_local": single["token_ids"] == expect and all(r["token_ids"] == expect for r in results)}


def batching_stats(procs: list[tuple[PeerProcess, dict]]) -> list[dict]:
    """Each server's batches so far: how many, their mean and largest size (in steps)."""
    out = []
    for p, _ in procs:
        b = p.status()["server"]["batching"]
        out.append({"batches": b["batches"], "mean_steps": b["steps"] / max(1, b["batches"]), "largest": b["largest"]})
    return out


def forward_by_batch(folder: Path, start: int, end: int) -> dict:
    """In process: decode tok/s through one block of blocks [start, end) for 1/2/4/8 sessions at once."""
    from pipeline.loading import load_span
    from pipeline.measure import batch_throughput

    tps = batch_throughput(load_span(folder, start, end, device="cpu"), (1, 2, 4, 8), context=64, steps=8)
    return {"blocks": [start, end], "tokens_per_s_per_block": {str(b): round(v, 1) for b, v in tps.items()},
            "over_batch_1": {str(b): round(v / tps[1], 2) for b, v in tps.items()}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("POTLUCK_DATA_DIR", Path.home() / ".potluck")))
    ap.add_argument("--model", type=Path, default=None, help="an HF folder (default: SmolLM2 from the data dir)")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in every process, local baseline included (default 1: on a small shared "
                         "machine more threads per process spin against each other)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients for the batching figures")
    ap.add_argument("--quick", action="store_true",
                    help="2 servers, 8 new tokens, 4 clients, no batching-off run: a smoke run of the figures")
    args = ap.parse_args(argv)
    if args.quick:
        args.servers, args.new_tokens, args.clients = 2, 8, 4
    torch.set_num_threads(args.threads)

    from pipeline.convert import ensure_default_model
    from pipeline.identity import model_id
    from pipeline.loading import ModelFolder
    from pipeline.measure import peak_rss

    folder = args.model or ensure_default_model(args.data_dir, progress=not args.json)
    mf = ModelFolder(folder)
    mid = model_id(mf)
    from transformers import AutoTokenizer, BatchEncoding

    tok = AutoTokenizer.from_pretrained(str(folder))
    encoded = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = list(cast(BatchEncoding, encoded)["input_ids"])  # return_dict=True: its annotation lists every mode's type
    n = args.new_tokens

    local = local_baselines(folder, ids, n)
    restating = tok.apply_chat_template(RESTATE, add_generation_prompt=True, tokenize=True, return_dict=True)
    local_spec = local_speculative(folder, list(cast(BatchEncoding, restating)["input_ids"]), n)
    with tempfile.TemporaryDirectory(prefix="potluck-bench-") as tmp:
        procs = start_servers(folder, args.servers, mf.config.num_layers, args.threads, Path(tmp))
        try:
            swarm = trio.run(swarm_runs, folder, mid, procs[0][0].addr, ids, n, local["tokens"])
            concurrent = concurrent_runs(folder, mid, procs[0][0].addr, ids, n, args.clients, args.threads,
                                         [p.proc.pid for p, _ in procs if p.proc], local["tokens"])
            concurrent["server_batches"] = batching_stats(procs)
            concurrent["announced_batch_decode_tps_per_block"] = [
                round(info["throughput"].get("batch_decode_tps", 0.0), 1) for _, info in procs]
            servers = [{"blocks": [info["start"], info["end"]], "peak_rss_bytes": rss_of(p.proc.pid).get("VmHWM") if p.proc else None,
                        "decode_tps_per_block": round(info["throughput"]["decode_tps"], 1)} for p, info in procs]
        finally:
            for p, _ in procs:
                p.stop()
                p.close()
        if not args.quick:  # the same clients on the same split with batching off
            procs = start_servers(folder, args.servers, mf.config.num_layers, args.threads, Path(tmp) / "unbatched",
                                  "--max-batch", "1")
            try:
                off = concurrent_runs(folder, mid, procs[0][0].addr, ids, n, args.clients, args.threads,
                                         [p.proc.pid for p, _ in procs if p.proc], local["tokens"])
                off["server_batches"] = batching_stats(procs)
            finally:
                for p, _ in procs:
                    p.stop()
                    p.close()
            concurrent["batching_off"] = off
            concurrent["aggregate_batched_over_unbatched"] = concurrent["aggregate_tokens_per_s"] / off["aggregate_tokens_per_s"]
    cut = round(mf.config.num_layers / args.servers)
    concurrent["forward_by_batch"] = forward_by_batch(folder, 0, cut)
    # the machine may be shared: measure the local baseline again after the swarm, keep the faster run
    again = local_baselines(folder, ids, n)
    for key in ("hf", "ours_local"):
        runs = [local[key]["tokens_per_s"], again[key]["tokens_per_s"]]
        if again[key]["tokens_per_s"] > local[key]["tokens_per_s"]:
            local[key] = again[key]
        local[key]["runs_tokens_per_s"] = runs
    full = peak_rss(str(folder), "full")
    runtime = full["baseline_rss_bytes"]
    server_peak = max(s["peak_rss_bytes"] or 0 for s in servers)
    hf_tps = local["hf"]["tokens_per_s"]
    report = {
        "model": mf.path.name, "model_id": mid[:16], "dtype": "float32", "new_tokens": n, "prompt_tokens": len(ids),
        "servers": args.servers, "cpu_threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "local_hf": local["hf"], "local_ours": local["ours_local"],
        "swarm_direct": swarm["direct"], "swarm_push": swarm["push"],
        "ratio_swarm_direct_vs_local_hf": swarm["direct"]["tokens_per_s"] / hf_tps,
        "ratio_swarm_push_vs_local_hf": swarm["push"]["tokens_per_s"] / hf_tps,
        "ratio_push_vs_direct": swarm["push"]["tokens_per_s"] / swarm["direct"]["tokens_per_s"],
        "per_hop_overhead": {
            "direct_ms": swarm["direct"]["per_hop_overhead_ms"], "push_ms": swarm["push"]["per_hop_overhead_ms"],
            "transport_rtt_ms": swarm["transport"]["libp2p"]["median_ms"], "tcp_rtt_ms": swarm["transport"]["tcp"]["median_ms"],
            "direct_over_transport_rtt": swarm["direct"]["per_hop_overhead_ms"] / swarm["transport"]["libp2p"]["median_ms"],
            "push_over_transport_rtt": swarm["push"]["per_hop_overhead_ms"] / swarm["transport"]["libp2p"]["median_ms"]},
        "concurrent": concurrent, "aggregate_over_single": concurrent["aggregate_over_single"],
        "speculative": swarm["speculative"], "speculative_over_plain": swarm["speculative"]["speculative_over_plain"],
        "local_hf_prompt_lookup": local_spec,
        "rss": {"server_processes": servers, "full_model_peak_bytes": full["peak_rss_bytes"],
                "runtime_baseline_bytes": runtime, "max_server_peak_bytes": server_peak,
                "server_over_full": server_peak / full["peak_rss_bytes"],
                "server_weights_over_full_weights": (server_peak - runtime) / max(1, full["peak_rss_bytes"] - runtime)},
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for k in ("local_hf", "local_ours", "swarm_direct", "swarm_push"):
            print(f"{k:14s} {report[k]['tokens_per_s']:7.1f} tok/s")
        hop = report["per_hop_overhead"]
        print(f"per-token per-hop overhead: direct {hop['direct_ms']:.2f} ms, push {hop['push_ms']:.2f} ms "
              f"(libp2p round trip {hop['transport_rtt_ms']:.2f} ms, TCP {hop['tcp_rtt_ms']:.2f} ms)")
        print(f"swarm/local: direct {report['ratio_swarm_direct_vs_local_hf']:.2f}, push {report['ratio_swarm_push_vs_local_hf']:.2f}")
        print(f"{args.clients} clients: aggregate/single {report['aggregate_over_single']:.2f}")
        spec = report["speculative"]
        print(f"speculative (restating prompt): {spec['speculative_over_plain']:.2f}x plain, "
              f"{spec['prompt_lookup']['tokens_per_pass']:.2f} tokens/pass, acceptance {spec['prompt_lookup']['acceptance']:.2f}; "
              f"local HF prompt lookup {report['local_hf_prompt_lookup']['prompt_lookup_over_plain']:.2f}x")
        print(json.dumps(report["rss"], indent=1))


if __name__ == "__main__":
    main()
