"""Adaptive spot checks (pipeline/checkpolicy.py) and the calibrated tolerances (pipeline/spotcheck.py).

The policy: a server new to the client has every step checked until it has `trust_after` verified
steps, then each step with a probability falling with its record; a failed check puts it back on
probation. The tolerances: honest servers on other thread counts or dtypes are never accused, lies
of the sizes the tests use are caught."""

import pytest
import torch
import trio

from bench.spotcheck import RateLiar
from pipeline.checkpolicy import AdaptivePolicy, FixedPolicy
from pipeline.client import ClientConfig
from pipeline.loading import ModelFolder, load_head, load_span
from pipeline.spotcheck import TOLERANCE, SpotCheckConfig, relative_error
from testkit.billing import add_client, add_server
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
FAST = {"decode_tps": 1e6, "prefill_tps": 1e7}
SLOW = {"decode_tps": 20.0, "prefill_tps": 200.0}


def test_probation_then_falling_probability_then_reset():
    policy = AdaptivePolicy(trust_after=10, scale=4.0, floor=0.01)
    assert policy.probability("new") == 1.0 and not policy.trusted("new")
    policy.verified("new", 9)
    assert policy.probability("new") == 1.0  # one step short of trust
    policy.verified("new", 1)
    assert policy.trusted("new") and policy.probability("new") == pytest.approx(0.4)
    seen = []
    for _ in range(50):
        policy.verified("new", 37)
        seen.append(policy.probability("new"))
    assert seen == sorted(seen, reverse=True) and seen[-1] == 0.01  # falls with the record, to the floor
    policy.failed("new")
    assert policy.probability("new") == 1.0 and policy.records["new"].failures == 1  # back on probation
    assert policy.probability("other") == 1.0  # records are per server


def test_records_are_bounded_least_recently_seen_first():
    policy = AdaptivePolicy(trust_after=1, max_servers=3)
    for p in "abc":
        policy.verified(p, 5)
    policy.probability("a")  # seen again: "b" is now the oldest
    policy.verified("d", 5)
    assert list(policy.records) == ["c", "a", "d"]
    with pytest.raises(ValueError):
        AdaptivePolicy(floor=1.5)


def test_fixed_fraction_stays_available():
    cfg = SpotCheckConfig(fraction=0.02)
    assert isinstance(cfg.selection(), FixedPolicy) and cfg.selection().probability("anyone") == 0.02
    assert cfg.enabled and not SpotCheckConfig(fraction=0.0).enabled
    assert isinstance(SpotCheckConfig().selection(), AdaptivePolicy)  # the default
    assert isinstance(ClientConfig().spot_check.selection(), AdaptivePolicy)


def test_tolerance_is_the_coarser_dtypes():
    cfg = SpotCheckConfig()
    assert cfg.tol(torch.float32) == TOLERANCE[torch.float32]
    assert cfg.tol(torch.float32, torch.bfloat16) == cfg.tol(torch.bfloat16, torch.float32) == TOLERANCE[torch.bfloat16]
    assert cfg.tol(torch.float32, torch.float16) == TOLERANCE[torch.float16]
    assert SpotCheckConfig(tolerance=0.5).tol(torch.float32) == 0.5


def _session(span, dtype, threads: int, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache = span.new_cache(sum(x.shape[1] for x in inputs))
        return [span.forward(x.to(dtype), cache).float() for x in inputs]
    finally:
        torch.set_num_threads(old)


def _lie(a: torch.Tensor, size: float) -> torch.Tensor:
    """`a` plus a constant on every element (the `LyingServer` kind of lie), `size` relative L2 per token."""
    return a + size * a.norm(dim=-1, keepdim=True) / a.shape[-1] ** 0.5


# the smallest lie each dtype's tolerance must still catch against float32 (bench/spotcheck.py `lies`)
CAUGHT = {torch.float32: 0.01, torch.float16: 0.1, torch.bfloat16: 0.3}


def test_honest_heterogeneous_servers_are_within_tolerance_and_lies_are_not(llama):
    """fp32 on 1 and 4 threads, bf16 and fp16 against fp32: every checked step within the pair's
    tolerance (a bounded sample; bench/spotcheck.py counts ≥ 10,000 steps), and a lie of CAUGHT's size
    over it."""
    mf = ModelFolder(llama[0])
    head = load_head(mf, dtype=torch.float32, device="cpu")
    spans = {d: load_span(mf, 0, 4, dtype=d, device="cpu") for d in CAUGHT}
    cfg = SpotCheckConfig()
    for seed in range(3):
        ids = torch.randint(0, mf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(seed))
        x = head.embed(ids)
        inputs = [x[:, :8]] + [x[:, i:i + 1] for i in range(8, 40)]
        ref = _session(spans[torch.float32], torch.float32, 1, inputs)
        runs = {(d, t): _session(spans[d], d, t, inputs) for d in CAUGHT for t in (1, 4)}
        for (d, _), outs in runs.items():
            tol = cfg.tol(d, torch.float32)
            for a, b in zip(outs, ref):
                assert relative_error(a, b) <= tol
                assert relative_error(_lie(a, CAUGHT[d]), b) > tol


@pytest.fixture(scope="module")
def llama(llama):
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


async def sees(model, want: dict[str, float]) -> None:
    """Until the client sees every server in `want` announcing that decode throughput; then every server
    it sees counts as reached, as if earlier sessions had opened each (routes believe the announced
    figures only of servers reached: this module routes by them)."""
    with trio.fail_after(20):
        while True:
            servers = {s.peer_id: s.decode_tps for s in await model.sequence.refresh(force=True)}
            if all(servers.get(p) == tps for p, tps in want.items()):
                break
            await trio.sleep(0.1)
    for peer_id in servers:
        model.sequence.note_reached(peer_id)


async def _announce(peer, tp: dict) -> None:
    peer.server.throughput = dict(tp)
    await peer.server.announce()


async def test_a_new_liar_is_caught_at_its_first_lie_before_it_is_used(llama):
    """Under the default policy a server new to the client is checked on every step: a liar honest for
    its first steps, then lying, is caught on its first lie, and the output equals local."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 10)
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            liar = await add_server(s, 0, 2, mid=mid, cfg=cfg, server_cls=RateLiar)
            liar.server.rate, liar.server.honest_steps = 1.0, 4
            honest = [await add_server(s, a, b, mid=mid, cfg=cfg) for a, b in [(0, 2), (0, 2), (2, 4)]]
            await _announce(liar, FAST)
            for p in honest[:2]:
                await _announce(p, SLOW)
            client, model = await add_client(s, mid=mid, cfg=cfg, spot_check=SpotCheckConfig(seed=0))
            liar_id = liar.network.peer_id
            await sees(model, {liar_id: FAST["decode_tps"], **{p.network.peer_id: SLOW["decode_tps"] for p in honest[:2]}})
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.servers[0][0] == liar_id and liar_id in model.sequence.distrusted
            assert g.token_ids == want  # the lie never reached the output
            (sid, first), = liar.server.first_lie.items()
            assert first == 5 and liar.server.steps[sid] == 5  # caught on the step it lied on
            policy = model.client_config.spot_check.policy
            assert policy.records[liar_id].verified == 0 and policy.records[liar_id].failures == 1
            assert not any(p.network.peer_id in model.sequence.distrusted for p in honest)


async def test_trust_earned_thins_checks_and_a_failure_resets_it(llama):
    """Honest servers: every step is checked until `trust_after` are verified, then (scale 0, floor 0)
    none; a server that then lies is still caught where checks happen (floor 1/2) and loses its trust."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 10)
    with trio.fail_after(120):
        async with swarm("sim", path, [], model_id=mid) as s:
            liar = await add_server(s, 0, 2, mid=mid, cfg=cfg, server_cls=RateLiar)
            liar.server.rate = 0.0
            honest = [await add_server(s, a, b, mid=mid, cfg=cfg) for a, b in [(0, 2), (0, 2), (2, 4), (2, 4)]]
            await _announce(liar, FAST)
            for p in honest[:2] + honest[3:]:  # routes: the liar, then honest[2]
                await _announce(p, SLOW)
            policy = AdaptivePolicy(trust_after=20, scale=0.0, floor=0.0)
            client, model = await add_client(s, mid=mid, cfg=cfg, spot_check=SpotCheckConfig(seed=1, policy=policy))
            liar_id = liar.network.peer_id
            await sees(model, {liar_id: FAST["decode_tps"],
                               **{p.network.peer_id: SLOW["decode_tps"] for p in honest[:2] + honest[3:]}})
            checks = []
            for _ in range(3):  # 10 steps each: probation, probation, trusted
                g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
                assert g.token_ids == want and g.route[0][0] == liar_id
                checks.append(g.spot_checks["checks"])
            tail = honest[2].network.peer_id
            assert g.route[1][0] == tail
            assert checks == [20, 20, 0]  # both hops, every step; then nothing
            assert policy.trusted(liar_id) and policy.trusted(tail)
            liar.server.rate = 1.0
            policy.floor = 0.5
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert liar_id in model.sequence.distrusted
            assert not policy.trusted(liar_id) and policy.records[liar_id].failures == 1
            assert policy.trusted(tail)  # the honest server kept its record
            assert not any(p.network.peer_id in model.sequence.distrusted for p in honest)


def test_serve_takes_a_fixed_fraction_and_refuses_one_out_of_range(tmp_path, capsys):
    from potluck.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), "--spot-check-fraction", "0.02"])
    assert args.spot_check_fraction == 0.02
    assert build_parser().parse_args(["serve", "--data-dir", str(tmp_path)]).spot_check_fraction is None  # adaptive
    assert main(["serve", "--data-dir", str(tmp_path), "--spot-check-fraction", "1.5"]) == 2
    assert "--spot-check-fraction" in capsys.readouterr().err
