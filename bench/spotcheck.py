"""Spot checks: honest float noise against the tolerances, false accusations, liars caught, and overhead.

`python -m bench.spotcheck --json` prints one JSON object:

- `noise`: for the tiny test model (4 blocks) and, with `--smollm2`, SmolLM2 (first `--smollm2-blocks`
  blocks), the per-token relative L2 error ‖a − b‖₂ / ‖b‖₂ (max and p99 over a prefill and decode
  steps) between honest runs of the same span on the same inputs: each dtype (float32, bfloat16,
  float16) on 1 and 4 torch threads against the float32 / 1-thread reference, and each pair of
  thread counts within a dtype — with the tolerance `SpotCheckConfig.tol` gives that pair and the
  margin (tolerance / worst honest error).
- `false_accusations`: honest heterogeneous servers (the same span, other thread counts; for
  mixed-dtype pairs the coarser dtype's tolerance) compared step by step exactly as the checker
  compares them, over `--honest-steps` checked steps per pair: the count of steps over the tolerance
  (the acceptance bar is 0).
- `lies`: the smallest lie (relative size, the `LyingServer` kind of perturbation: a constant added to
  every element) each pair's tolerance still catches.
- `liars`: whole generations through a simulated swarm (in process: a `RateLiar` that lies on 100 %,
  5 % or 1 % of its steps and announces itself fastest, two honest servers for its span, one for
  the rest), `--generations` generations per rate and policy, each by a fresh client: under the
  adaptive policy with the liar new to the client (`adaptive_new`), with the liar trusted after
  1,000 honestly verified steps (`adaptive_trusted`), and under a fixed 2 %. Per case: the
  generations in which it lied, the fraction of those in which it was caught, the steps it served
  from its first lie to its detection, the fraction of generations whose greedy output equals local
  (overall and among those where it was caught), and honest servers accused.
- `liar_processes`: the liar as a real peer process (`bench.liarpeer`, rates `--process-rates`), two
  honest `potluck serve` processes for its span and one for the rest, on loopback libp2p; a fresh
  client in this process (adaptive policy) per generation, `--process-generations` per rate.
- `slow_checker`: a liar new to the client (lying from its second step) whose nearest replica answers
  every step `--checker-delay` seconds late, two honest replicas farther: the generation's wall time,
  checks, checks that timed out and the seconds waited for checkers, with bounded checks (the
  default: a check waits `wait_min` + `wait_factor` × its steps' own time, then the output is used
  unchecked for now and a checker that misses twice is swapped) against checks that wait for the
  checker up to the step timeout, in the same run; and whether the liar was caught in each.
- `overhead`: honest swarm (two servers per span), one client per policy generating
  `--overhead-generations` times in a row: the checkers' extra compute per token served — tokens
  re-run by checkers over tokens run by the route's hops (all hops span 2 of the 4 blocks, so this
  is the extra block compute per generated token, as a fraction) — adaptive vs fixed 2 % over the
  same number of generations, over the first generation (servers on probation) and the last quarter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

import torch
import trio

from dht.node import DHTConfig, DHTNode
from p2p.sim import Place, SimWorld
from pipeline.client import ClientConfig, DistributedModel
from pipeline.identity import model_id as compute_model_id
from pipeline.loading import ModelFolder, load_head, load_local_model, load_span
from pipeline.proofs import result_digests
from pipeline.server import BlockServer, ServerConfig
from pipeline.spotcheck import SpotCheckConfig, relative_error
from potluck.localswarm import PeerProcess

FIXED_TP = {"decode_tps": 1000.0, "prefill_tps": 10000.0}
# The liar announces itself far faster than the honest servers of its span, so that every fresh client
# routes through it whatever its RTT estimates (a 2 ms edge, 1,000 tokens/s, is within their noise).
FAST_TP = {"decode_tps": 1e6, "prefill_tps": 1e7}
SLOW_TP = {"decode_tps": 20.0, "prefill_tps": 200.0}
PROMPT = [5, 17, 42, 8, 99, 3]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_tiny_llama(path: Path) -> Path:
    """The tests' tiny random Llama (tests/testkit/models.py), saved to `path`."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-5,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(path)
    return path


def session_inputs(folder: ModelFolder, prefill: int, decode: int, seed: int) -> list[torch.Tensor]:
    """A session's step inputs (float32 embeddings of random tokens): one prefill, then single tokens."""
    head = load_head(folder, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, folder.config.vocab_size, (1, prefill + decode), generator=g)
    x = head.embed(ids)
    return [x[:, :prefill]] + [x[:, i:i + 1] for i in range(prefill, prefill + decode)]


def run_session(span, steps: list[torch.Tensor], threads: int) -> list[torch.Tensor]:
    """Outputs of every step of one session through `span` on `threads` torch threads (float32)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache = span.new_cache(sum(s.shape[1] for s in steps))
        return [span.forward(s.to(span.dtype), cache).float() for s in steps]
    finally:
        torch.set_num_threads(old)


def per_token_errors(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[float]:
    """The checker's comparison (pipeline.spotcheck.relative_error) token by token."""
    return [relative_error(x[:, t:t + 1], y[:, t:t + 1]) for x, y in zip(a, b) for t in range(x.shape[1])]


CONFIGS = [(d, t) for d in DTYPES for t in (1, 4)]


def pairs() -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """Every pair of honest configurations compared: thread counts within a dtype, each against float32/1."""
    out = [((d, 1), (d, 4)) for d in DTYPES]
    out += [((d, t), ("float32", 1)) for d, t in CONFIGS if d != "float32"]
    return out


def measure_noise(folder: Path, blocks: int, sessions: int, prefill: int, decode: int) -> dict:
    """Honest per-token errors between configurations, over `sessions` sessions of the span [0, blocks)."""
    mf = ModelFolder(folder)
    spans = {d: load_span(mf, 0, blocks, dtype=DTYPES[d], device="cpu") for d in DTYPES}
    errs: dict[str, list[float]] = {}
    for k in range(sessions):
        steps = session_inputs(mf, prefill, decode, seed=k)
        outs = {(d, t): run_session(spans[d], steps, t) for d, t in CONFIGS}
        for a, b in pairs():
            errs.setdefault(f"{a[0]}/{a[1]}t vs {b[0]}/{b[1]}t", []).extend(per_token_errors(outs[a], outs[b]))
    report = {}
    cfg = SpotCheckConfig()
    for (a, b), (name, e) in zip(pairs(), errs.items()):
        tol = cfg.tol(DTYPES[a[0]], DTYPES[b[0]])
        worst = max(e)
        report[name] = {"tokens": len(e), "max": worst, "p99": sorted(e)[int(0.99 * (len(e) - 1))],
                        "tolerance": tol, "over_tolerance": sum(x > tol for x in e),
                        "margin": round(tol / worst, 1) if worst > 0 else None}
    return report


def smallest_lie_caught(folder: Path, blocks: int, prefill: int, decode: int) -> dict:
    """Per pair: the smallest relative size of a `LyingServer`-style lie (a constant added to every element)
    over the pair's tolerance on every token, from a ladder of sizes."""
    mf = ModelFolder(folder)
    spans = {d: load_span(mf, 0, blocks, dtype=DTYPES[d], device="cpu") for d in DTYPES}
    steps = session_inputs(mf, prefill, decode, seed=12345)
    outs = {(d, t): run_session(spans[d], steps, t) for d, t in CONFIGS}
    cfg = SpotCheckConfig()
    ladder = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 1.0]
    report = {}
    for a, b in pairs():
        tol = cfg.tol(DTYPES[a[0]], DTYPES[b[0]])
        caught = None
        for size in ladder:
            # the liar is `a`: out + c · mean|out|, scaled so that the lie alone is `size` relative L2
            lied = []
            for x in outs[a]:
                c = torch.ones_like(x) * x.abs().mean()
                scale = size * x.norm(dim=-1, keepdim=True) / c.norm(dim=-1, keepdim=True)
                lied.append(x + scale * c)
            if min(per_token_errors(lied, outs[b])) > tol:
                caught = size
                break
        report[f"{a[0]}/{a[1]}t vs {b[0]}/{b[1]}t"] = {"tolerance": tol, "smallest_lie_caught": caught}
    return report


def false_accusations(folder: Path, steps_wanted: int, prefill: int, session_len: int) -> dict:
    """Honest pairs compared step by step as the checker does (one comparison per checked step)."""
    mf = ModelFolder(folder)
    spans = {d: load_span(mf, 0, mf.config.num_layers, dtype=DTYPES[d], device="cpu") for d in DTYPES}
    cfg = SpotCheckConfig()
    counts = {f"{a[0]}/{a[1]}t vs {b[0]}/{b[1]}t": [0, 0] for a, b in pairs()}
    worst = dict.fromkeys(counts, 0.0)
    seed = 0
    while min(c[0] for c in counts.values()) < steps_wanted:
        steps = session_inputs(mf, prefill, session_len - prefill, seed=1000 + seed)
        seed += 1
        outs = {(d, t): run_session(spans[d], steps, t) for d, t in CONFIGS}
        for a, b in pairs():
            name = f"{a[0]}/{a[1]}t vs {b[0]}/{b[1]}t"
            tol = cfg.tol(DTYPES[a[0]], DTYPES[b[0]])
            for x, y in zip(outs[a], outs[b]):
                err = relative_error(x, y)
                counts[name][0] += 1
                counts[name][1] += err > tol
                worst[name] = max(worst[name], err)
    return {name: {"checked_steps": c[0], "false_accusations": c[1], "worst_error": worst[name]}
            for name, c in counts.items()}



# --- whole generations through a simulated swarm ---------------------------------------------------


S = TypeVar("S", bound=BlockServer)


class RateLiar(BlockServer):
    """Lies (adds a constant of 5 % of the mean magnitude to every element) on each step after its first
    `honest_steps` with probability `rate`; keeps, per session, the step of its first lie and how many steps it served."""

    rate = 1.0
    honest_steps = 0  # steps of each session it never lies on

    def __init__(self, *a, seed: int = 0, **kw):
        super().__init__(*a, **kw)
        self.rng = random.Random(seed)
        self.first_lie: dict[bytes, int] = {}
        self.steps: dict[bytes, int] = {}

    async def _run(self, session, *args, **kw):
        ran = await super()._run(session, *args, **kw)
        if ran is None:
            return ran
        self.steps[session.id] = session.steps
        if session.steps > self.honest_steps and self.rng.random() < self.rate:
            self.first_lie.setdefault(session.id, session.steps)
            out, compute_s, served, signed = ran
            out = out + 0.05 * out.abs().mean()
            if signed is not None:  # it signs what it returns, as a server that cuts corners would
                signed = (signed[0], *result_digests(out, session.seed))
            return out, compute_s, served, signed
        return ran


class SimSwarm:
    """Servers and clients on one `SimWorld`, each peer with its DHT node, in this process."""

    def __init__(self, world: SimWorld, nursery: trio.Nursery, folder: Path, model_id: str):
        self.world, self.nursery, self.folder, self.model_id = world, nursery, folder, model_id
        self.bootstrap: list[str] = []
        self.head = load_head(folder, dtype=torch.float32, device="cpu")

    async def _node(self, client_mode: bool) -> tuple:
        net = self.world.add_node(place=Place(50.0, 8.0, "eu-west", last_mile_ms=0.5))
        dht = DHTNode(net, bootstrap=list(self.bootstrap), client_mode=client_mode,
                      config=DHTConfig(request_timeout=2.0, cluster_thresholds={}, bootstrap_retry=0.5))
        await self.nursery.start(dht.run)
        if not self.bootstrap and not client_mode:
            self.bootstrap.append(net.listen_addrs()[0])
        return net, dht

    async def server(self, a: int, b: int, cls: type[S] = BlockServer, tp: dict = FIXED_TP, **kw) -> S:  # type: ignore[assignment]
        net, dht = await self._node(False)
        server = cls(net, dht, self.folder, a, b, config=ServerConfig(throughput=dict(tp), announce_period=5.0),
                     model_id=self.model_id, **kw)
        await self.nursery.start(server.run)
        return server

    async def client_node(self) -> tuple:
        return await self._node(True)

    def model(self, node: tuple, spot_check: SpotCheckConfig) -> DistributedModel:
        """A fresh client (its own route view, bans and trust) on `node`."""
        net, dht = node
        return DistributedModel(ModelFolder(self.folder), self.head, net, dht, self.model_id,
                                config=ClientConfig(spot_check=spot_check, step_timeout=30.0))


async def sees(model: DistributedModel, n: int) -> None:
    """Wait until `model` reads `n` servers' announcements, and take them as reached (as if earlier sessions
    had opened them): these runs measure spot checks — which servers lie, which check — not routing's
    distrust of servers never opened (a liar's throughput claim is what routes through it)."""
    with trio.fail_after(30):
        while len(servers := await model.sequence.refresh(force=True)) < n:
            await trio.sleep(0.1)
    for server in servers:
        model.sequence.note_reached(server.peer_id)


POLICIES = ["adaptive_new", "adaptive_trusted", "fixed_2pct"]
EARNED = 1000  # verified steps the liar earned (honestly) before it started lying, in "adaptive_trusted"


def spot_config(name: str, seed: int, liar: str) -> SpotCheckConfig:
    if name == "fixed_2pct":
        return SpotCheckConfig(fraction=0.02, seed=seed)
    spot = SpotCheckConfig(seed=seed)
    if name == "adaptive_trusted":
        spot.policy.verified(liar, EARNED)
    return spot


async def liar_runs(folder: Path, model_id: str, rates: list[float], generations: int, new_tokens: int) -> dict:
    """Per lie rate and policy, `generations` generations, each by a fresh client (see the module docstring)."""
    want = load_local_model(folder, device="cpu").generate_greedy(PROMPT, new_tokens)
    out: dict = {}
    async with SimWorld.open(seed=0) as world, trio.open_nursery() as nursery:
        sw = SimSwarm(world, nursery, folder, model_id)
        honest: list[BlockServer] = [await sw.server(0, 2, tp=SLOW_TP) for _ in range(2)] + [await sw.server(2, 4)]
        liar = await sw.server(0, 2, cls=RateLiar, tp=FAST_TP, seed=1)
        liar_id = liar.network.peer_id
        node = await sw.client_node()
        for rate in rates:
            liar.rate = rate
            for name in POLICIES:
                runs = []
                for g in range(generations):
                    model = sw.model(node, spot_config(name, 1000 * g + 7, liar_id))
                    await sees(model, 4)
                    before = set(liar.steps)
                    gen = await model.generate(PROMPT, max_new_tokens=new_tokens, stop_token_ids=[])
                    lied = [sid for sid in liar.steps if sid not in before and sid in liar.first_lie]
                    runs.append({
                        "lied": bool(lied), "caught": liar_id in model.sequence.distrusted,
                        "identical": gen.token_ids == want,
                        # the liar's steps from its first lie (that one included) to the end of its sessions
                        "steps_to_detection": sum(liar.steps[s] - liar.first_lie[s] + 1 for s in lied),
                        "false_accusations": sum(h.network.peer_id in model.sequence.distrusted for h in honest),
                        "checked_tokens": gen.spot_checks["checked_tokens"] if gen.spot_checks else 0,
                    })
                with_lie = [r for r in runs if r["lied"]]
                caught = [r for r in with_lie if r["caught"]]
                std = [r["steps_to_detection"] for r in caught]
                out.setdefault(f"rate_{rate:g}", {})[name] = {
                    "generations": len(runs), "generations_with_a_lie": len(with_lie),
                    "detection_probability": round(len(caught) / len(with_lie), 3) if with_lie else None,
                    "steps_to_detection_median": statistics.median(std) if std else None,
                    "steps_to_detection_max": max(std) if std else None,
                    "output_identical_to_local": round(sum(r["identical"] for r in runs) / len(runs), 3),
                    "output_identical_when_caught": (round(sum(r["identical"] for r in caught) / len(caught), 3)
                                                     if caught else None),
                    "false_accusations": sum(r["false_accusations"] for r in runs),
                }
        nursery.cancel_scope.cancel()
    return out


class SlowChecker(BlockServer):
    """Answers every step `delay` seconds late: a replica across a slow link."""

    delay = 3.0

    async def _run(self, session, *args, **kw):
        await trio.sleep(self.delay)
        return await super()._run(session, *args, **kw)


async def slow_checker_runs(folder: Path, model_id: str, delay: float, new_tokens: int) -> dict:
    """A liar new to the client (lies from its 2nd step), its nearest replica a `SlowChecker`, two honest
    replicas farther away: one generation with bounded checks (the default) and one where a check waits
    for its checker up to the step timeout (the baseline, how checks waited before), each by a fresh client."""
    out: dict = {"checker_delay_s": delay, "new_tokens": new_tokens}
    async with SimWorld.open(seed=0) as world, trio.open_nursery() as nursery:
        sw = SimSwarm(world, nursery, folder, model_id)
        liar = await sw.server(0, 2, cls=RateLiar, tp=FAST_TP, seed=1)
        liar.honest_steps = 1
        slow = await sw.server(0, 2, cls=SlowChecker, tp={"decode_tps": 1.0, "prefill_tps": 10.0})
        slow.delay = delay
        far: set[str] = set()
        for _ in range(2):
            far.add((await sw.server(0, 2, tp=SLOW_TP)).network.peer_id)
        await sw.server(2, 4)
        node = await sw.client_node()
        for name, spot in [("bounded", SpotCheckConfig()), ("unbounded", SpotCheckConfig(wait_min=math.inf))]:
            model = sw.model(node, spot)
            await sees(model, 5)
            model.sequence.rtt = lambda peer_id: 0.5 if peer_id in far else 0.0  # type: ignore[method-assign]
            gen = await model.generate(PROMPT, max_new_tokens=new_tokens, stop_token_ids=[])
            checks = gen.spot_checks or {}
            out[name] = {"wall_s": round(gen.wall_s, 3), "checks": checks.get("checks", 0),
                         "timeouts": checks.get("timeouts", 0),
                         "waited_s": round(checks.get("waited_s", 0.0), 3),
                         "liar_caught": liar.network.peer_id in model.sequence.distrusted,
                         "slow_checker_banned": slow.network.peer_id in model.sequence.banned()}
        nursery.cancel_scope.cancel()
    out["bound_s"] = SpotCheckConfig().wait_min  # plus wait_factor × the checked steps' own (ms) time
    out["wall_ratio_bounded_to_unbounded"] = round(out["bounded"]["wall_s"] / out["unbounded"]["wall_s"], 3)
    return out


async def overhead_runs(folder: Path, model_id: str, generations: int, new_tokens: int) -> dict:
    """Honest swarm, one client per policy generating `generations` times: checker tokens per hop token."""
    out: dict = {}
    async with SimWorld.open(seed=0) as world, trio.open_nursery() as nursery:
        sw = SimSwarm(world, nursery, folder, model_id)
        for a, b in [(0, 2), (0, 2), (2, 4), (2, 4)]:
            await sw.server(a, b)
        node = await sw.client_node()
        # unseeded: a seeded SpotCheckConfig draws the same steps in every session
        for name, spot in [("adaptive", SpotCheckConfig()), ("fixed_2pct", SpotCheckConfig(fraction=0.02))]:
            model = sw.model(node, spot)
            await sees(model, 4)
            per_gen = []
            for _ in range(generations):
                gen = await model.generate(PROMPT, max_new_tokens=new_tokens, stop_token_ids=[])
                hop_tokens = (len(PROMPT) + new_tokens - 1) * len(gen.route)  # all hops span 2 of the 4 blocks
                per_gen.append((gen.spot_checks or {}).get("checked_tokens", 0) / hop_tokens)
                if model.sequence.distrusted:
                    raise AssertionError(f"honest servers accused: {model.sequence.distrusted}")
            tail = per_gen[-max(1, generations // 4):]
            out[name] = {"generations": generations,
                         "checker_compute_per_token": round(statistics.mean(per_gen), 4),
                         "first_generation": round(per_gen[0], 4),
                         "last_quarter": round(statistics.mean(tail), 4)}
        nursery.cancel_scope.cancel()
    fixed = out["fixed_2pct"]["checker_compute_per_token"]
    out["adaptive_over_fixed"] = round(out["adaptive"]["checker_compute_per_token"] / fixed, 3) if fixed else None
    fixed = out["fixed_2pct"]["last_quarter"]
    out["adaptive_over_fixed_last_quarter"] = round(out["adaptive"]["last_quarter"] / fixed, 3) if fixed else None
    return out


def _liar_log(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(first lie, steps served) per session, from a `bench.liarpeer` peer's log."""
    first: dict[str, int] = {}
    steps: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("LIE", "STEP") and parts[2].isdigit():
            (first if parts[0] == "LIE" else steps)[parts[1]] = int(parts[2])
    return first, steps


async def _process_client(folder: Path, model_id: str, bootstrap: str, liar: PeerProcess, generations: int,
                          new_tokens: int, want: list[int]) -> dict:
    from credits import Ledger
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from pipeline.billing import ClientBilling
    from pipeline.pricing import ModelPricing

    identity = Identity.generate()
    billing = ClientBilling(Ledger.open(identity, pricing=ModelPricing()))  # `potluck serve` bills every step
    mf, head = ModelFolder(folder), load_head(folder, dtype=torch.float32, device="cpu")
    runs = []
    async with Libp2pNetwork.open(identity, ["/ip4/127.0.0.1/tcp/0"]) as net:
        dht = DHTNode(net, bootstrap=[bootstrap], client_mode=True)
        async with trio.open_nursery() as nursery:
            await nursery.start(dht.run)
            for g in range(generations):
                model = DistributedModel(mf, head, net, dht, model_id, config=ClientConfig(
                    billing=billing, spot_check=SpotCheckConfig(seed=g), step_timeout=30.0))
                await sees(model, 4)
                before = set(_liar_log(liar.log_path)[1])
                gen = await model.generate(PROMPT, max_new_tokens=new_tokens, stop_token_ids=[])
                first, steps = _liar_log(liar.log_path)
                lied = [s for s in steps if s not in before and s in first]
                runs.append({"routed": liar.peer_id in [p for p, _, _ in gen.servers], "lied": bool(lied),
                             "caught": liar.peer_id in model.sequence.distrusted,
                             "identical": gen.token_ids == want,
                             "steps_to_detection": sum(steps[s] - first[s] + 1 for s in lied),
                             "accused": len(model.sequence.distrusted.keys() - {liar.peer_id})})
            nursery.cancel_scope.cancel()
    with_lie = [r for r in runs if r["lied"]]
    caught = [r for r in with_lie if r["caught"]]
    std = [r["steps_to_detection"] for r in caught]
    return {"generations": len(runs), "routed_through_liar": sum(r["routed"] for r in runs),
            "generations_with_a_lie": len(with_lie),
            "detection_probability": round(len(caught) / len(with_lie), 3) if with_lie else None,
            "steps_to_detection_max": max(std) if std else None,
            "output_identical_to_local": round(sum(r["identical"] for r in runs) / len(runs), 3),
            "false_accusations": sum(r["accused"] for r in runs)}


def process_runs(folder: Path, model_id: str, rates: list[float], generations: int, new_tokens: int,
                 root: Path) -> dict:
    """The liar as a real peer process (`bench.liarpeer`), two honest processes for its span and one for
    the rest; a fresh client in this process (libp2p on loopback, adaptive policy) per generation."""
    from potluck.localswarm import start_all

    want = load_local_model(folder, device="cpu").generate_greedy(PROMPT, new_tokens)
    common = ["--model", str(folder), "--threads", "1"]
    wrap = [sys.executable, "-m", "bench.liarpeer"]
    head = PeerProcess(root / "tail", *common, "--blocks", "2:4").start(timeout=180)
    boot = ["--bootstrap", head.addr]
    honest = [PeerProcess(root / f"honest{i}", *common, *boot, "--blocks", "0:2",
                   command=[*wrap, "--lie-rate", "0", "--announce-tps", "20"]) for i in range(2)]
    procs = [head, *honest]
    try:
        start_all(honest, timeout=180)
        result: dict = {}
        for rate in rates:  # one liar process per rate: its rate is fixed at start
            liar = PeerProcess(root / f"liar{rate:g}", *common, *boot, "--blocks", "0:2",
                        command=[*wrap, "--lie-rate", str(rate), "--lie-seed", "1", "--announce-tps", "1e6"])
            procs.append(liar)
            liar.start(timeout=180)
            result[f"rate_{rate:g}"] = trio.run(_process_client, folder, model_id, head.addr, liar, generations,
                                                new_tokens, want)
            liar.stop()  # SIGTERM: it announces that it is offline, and the next liar takes its place
        return result
    finally:
        for p in procs:
            p.close()

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=8, help="sessions per noise measurement")
    parser.add_argument("--honest-steps", type=int, default=10000)
    parser.add_argument("--smollm2", action="store_true", help="also measure SmolLM2's noise (converted on first use)")
    parser.add_argument("--smollm2-blocks", type=int, default=30)
    parser.add_argument("--data-dir", default=None, help="where SmolLM2 is converted (default: a temp dir)")
    parser.add_argument("--generations", type=int, default=50, help="generations per lie rate and policy")
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 0.05, 0.01])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--overhead-generations", type=int, default=40)
    parser.add_argument("--checker-delay", type=float, default=3.0, help="seconds the slow checker answers late")
    parser.add_argument("--process-generations", type=int, default=None,
                        help="generations per lie rate with the liar as a real peer process (0: skip; "
                             "default 50, --quick 0)")
    parser.add_argument("--process-rates", type=float, nargs="*", default=[1.0, 0.05])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds: a smoke run of every figure")
    args = parser.parse_args(argv)
    if args.quick:
        args.sessions, args.honest_steps, args.generations, args.overhead_generations = 2, 200, 2, 4
        args.new_tokens, args.checker_delay = 8, 1.5
    if args.process_generations is None:
        args.process_generations = 0 if args.quick else 50
    result: dict = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_llama(Path(tmp) / "tiny")
        result["noise"] = {"tiny": measure_noise(tiny, 4, args.sessions, 16, 32)}
        result["lies"] = {"tiny": smallest_lie_caught(tiny, 4, 16, 32)}
        result["false_accusations"] = {"tiny": false_accusations(tiny, args.honest_steps, 8, 64)}
        mid = compute_model_id(tiny)
        result["liars"] = trio.run(liar_runs, tiny, mid, args.rates, args.generations, args.new_tokens)
        result["overhead"] = trio.run(overhead_runs, tiny, mid, args.overhead_generations, args.new_tokens)
        result["slow_checker"] = trio.run(slow_checker_runs, tiny, mid, args.checker_delay, args.new_tokens)
        if args.process_generations:
            result["liar_processes"] = process_runs(tiny, mid, args.process_rates, args.process_generations,
                                                    args.new_tokens, Path(tmp) / "peers")
        if args.smollm2:
            from pipeline.convert import ensure_default_model

            folder = ensure_default_model(args.data_dir or tmp, progress=False)
            blocks = min(args.smollm2_blocks, ModelFolder(folder).config.num_layers)
            result["noise"]["smollm2"] = measure_noise(folder, blocks, max(1, args.sessions // 4), 16, 16)
            result["lies"]["smollm2"] = smallest_lie_caught(folder, blocks, 16, 16)
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
