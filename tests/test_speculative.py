"""Speculative decoding (pipeline/speculative.py): prompt-lookup drafts, the acceptance rule (greedy and a
statistical test of the sampled rule), adaptive k; through a swarm: output identical to plain decoding
(greedy and seeded sampling), servers roll their caches back, a server killed mid-speculation changes
nothing, spot checks see only kept positions, and rejected drafts are not billed."""

import random
from collections import Counter

import pytest
import torch
import trio

from pipeline.client import Finished
from pipeline.hop import StepRecord
from pipeline.loading import ModelFolder
from pipeline.protocol import MAX_REFUNDED_TOKENS, refunded_tokens
from pipeline.sampling import Sampler, SamplingParams
from pipeline.speculative import DraftLength, PromptLookup, SpeculativeConfig, verify, with_draft_model
from pipeline.spotcheck import SpotCheckConfig
from testkit.billing import add_client, add_server, latest_receipts
from testkit.swarms import swarm

TEXT = [random.Random(0).randrange(1, 100) for _ in range(24)]
RESTATING = TEXT + [7] + TEXT[:6]  # the text, then its start again: prompt lookup drafts the rest of it
RANDOM = [random.Random(1).randrange(1, 100) for _ in range(12)]


@pytest.fixture(scope="module")
def llama(llama):
    """The shared tiny Llama (tests/conftest.py) and its config, which the ledgers price receipts by."""
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


class Oracle:
    """Drafts the plain continuation `want` of `prompt`, every third draft wrong: mixed acceptance, many rollbacks."""

    def __init__(self, prompt: list[int], want: list[int]):
        self.prompt, self.want = prompt, want

    async def draft(self, context: list[int], k: int) -> list[int]:
        done = len(context) - len(self.prompt)
        return [t if (done + j) % 3 != 2 else (t + 1) % 101 for j, t in enumerate(self.want[done:done + k])]


def oracle(prompt: list[int], want: list[int]) -> SpeculativeConfig:
    # k from the acceptance alone (a fixed position cost): what the tests assert must not hang on timings
    return SpeculativeConfig(make_drafter=lambda: Oracle(prompt, want), position_cost=0.05)


# --- units ----------------------------------------------------------------------------------------------------


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    d = PromptLookup(ngram_max=3)
    assert d.lookup([1, 2, 3, 4], 3) == []  # nothing repeats
    assert d.lookup([1, 2, 3, 4, 9, 1, 2], 3) == [3, 4, 9]
    # the longest n-gram wins over a later shorter one; k bounds the draft; the context grows
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 5, 2], 2) == [5, 2]  # "2" alone: latest occurrence
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 5, 2, 3], 4) == [4, 9, 1, 2]  # "2 3" matches at the start
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 5, 2, 3], 0) == []


def test_greedy_acceptance_takes_the_matching_prefix_and_the_models_token():
    pick = Sampler(SamplingParams())
    logits = torch.full((4, 10), -1.0)
    for j, t in enumerate([3, 4, 5, 6]):
        logits[j, t] = 1.0
    assert verify(pick, logits, [3, 4, 5], 0) == [3, 4, 5, 6]  # all accepted, plus the bonus token
    assert verify(pick, logits, [3, 9, 5], 0) == [3, 4]  # the first mismatch ends the pass
    assert verify(pick, logits[:1], [], 0) == [3]


def test_sampled_acceptance_is_the_speculative_sampling_rule():
    """A point-mass draft d on p: accepted with probability p(d); otherwise the token follows p without d;
    overall the tokens follow p. 6000 trials, bounds at ~4.5 sigma."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(p).repeat(2, 1)
    n = 6000
    for d in (0, 2):
        sampler = Sampler(SamplingParams(temperature=1.0, seed=11 + d))
        outs = [verify(sampler, logits, [d], i) for i in range(n)]
        accepted = sum(o[0] == d for o in outs)
        assert abs(accepted / n - p[d]) < 4.5 * (p[d] * (1 - p[d]) / n) ** 0.5
        rejected = Counter(o[0] for o in outs if o[0] != d)
        assert all(len(o) == (2 if o[0] == d else 1) for o in outs)
        rest = p.clone()
        rest[d] = 0
        rest /= rest.sum()
        m = n - accepted
        for t in range(4):
            if t != d:
                q = float(rest[t])
                assert abs(rejected[t] / m - q) < 4.5 * (q * (1 - q) / m) ** 0.5 + 1e-9
    # the same seed and index give the same token however many positions a pass verifies
    s = Sampler(SamplingParams(temperature=1.0, seed=5))
    plain = [s(logits[0], i) for i in range(50)]
    assert [verify(s, logits[:1], [], i)[0] for i in range(50)] == plain


def test_draft_length_follows_acceptance_and_cost():
    good = DraftLength(max_k=8)
    for _ in range(30):
        good.observe(good.next_k() or 1, good.next_k() or 1, 0.01)
    assert good.next_k() == 8
    bad = DraftLength(max_k=8)
    for _ in range(30):
        bad.observe(4, 0, 0.01)
    assert bad.next_k() == 0
    for _ in range(40):  # no drafts for a while: the evidence ages, drafting is tried again
        bad.observe(0, 0, 0.01)
    assert bad.next_k() >= 1
    cheap, dear = DraftLength(prior_cost=0.02), DraftLength(prior_cost=0.5)
    for x in (cheap, dear):
        x.accepted, x.rejected = 3.0, 1.0
    assert cheap.next_k() > dear.next_k()
    # measured: a long round trip (0.1 s) with cheap positions vs a short one with dear positions
    far, near = DraftLength(), DraftLength()
    for i in range(40):
        drafted = [0, 2, 4, 6][i % 4]
        far.observe(drafted, drafted * 3 // 4, 0.1 + 0.001 * (1 + drafted))
        near.observe(drafted, drafted * 3 // 4, 0.002 + 0.004 * (1 + drafted))
    assert far.relative_cost == pytest.approx(0.001 / 0.101, rel=1e-3)
    assert near.relative_cost == pytest.approx(0.004 / 0.006, rel=1e-3)
    assert far.next_k() > near.next_k()


def test_refunds_cover_only_the_previous_steps_drafts():
    assert refunded_tokens(10, 5, 12) == 3  # the last 3 of the step at 10..14 are rolled back
    assert refunded_tokens(10, 5, 15) == 0  # nothing rolled back
    assert refunded_tokens(10, 5, 10) == 0  # the whole step again: a re-run, billed
    assert refunded_tokens(10, 5, 4) == 0
    assert refunded_tokens(0, 1000, 1) == MAX_REFUNDED_TOKENS  # a prefill is not a draft
    r = StepRecord(3, torch.zeros(1, 6, 2), (2, 4), torch.ones(1, 6, 2))
    cut = r.upto(6)
    assert cut.chunks == (2, 1) and cut.tokens == 3 and cut.outputs.shape == (1, 3, 2)
    assert r.upto(9) is r


# --- through a swarm ----------------------------------------------------------------------------------------


async def test_greedy_and_seeded_output_identical_with_speculation(llama):
    path, mid, local, _ = llama
    with trio.fail_after(120):
        async with swarm("sim", path, [(0, 2), (2, 4)], model_id=mid) as s:
            model = await s.client(spot_check=None)
            for prompt in (RESTATING, RANDOM):
                want = local.generate_greedy(prompt, 24)
                for spec in (False, True, oracle(prompt, want)):
                    g = await model.generate(prompt, max_new_tokens=24, stop_token_ids=[], speculative=spec)
                    assert g.token_ids == want, (prompt, spec)
                    if spec is not False:
                        x = g.speculation
                        assert x.tokens == len(want) - 1 and g.steps == 1 + x.passes
                if isinstance(spec, SpeculativeConfig):  # the oracle's drafts: accepted and rejected ones
                    assert 0 < x.accepted < x.drafted and x.tokens_per_pass > 1.5
            kw = dict(max_new_tokens=20, temperature=0.9, top_k=20, seed=7, stop_token_ids=[])
            plain = await model.generate(RESTATING, speculative=False, **kw)
            drafted = await model.generate(RESTATING, speculative=oracle(RESTATING, plain.token_ids), **kw)
            assert drafted.token_ids == plain.token_ids and drafted.speculation.accepted > 0
            assert (await model.generate(RESTATING, speculative=True, **kw)).token_ids == plain.token_ids


async def test_a_local_draft_model_drafts_what_the_route_accepts(llama, tmp_path):
    """The tiny model as its own draft model: nearly every draft is accepted, the output is plain greedy's;
    a draft model with another vocabulary is refused."""
    path, mid, local, _ = llama
    want = local.generate_greedy(RANDOM, 24)
    spec = await trio.to_thread.run_sync(lambda: with_draft_model(str(path), local.cfg.vocab_size, position_cost=0.05))
    with trio.fail_after(120):
        async with swarm("sim", path, [(0, 2), (2, 4)], model_id=mid) as s:
            model = await s.client(spot_check=None, speculative=spec)
            for _ in range(2):  # the draft cache rolls back between generations too
                g = await model.generate(RANDOM, max_new_tokens=24, stop_token_ids=[])
                assert g.token_ids == want
                assert g.speculation.acceptance > 0.9 and g.speculation.tokens_per_pass > 3
    with pytest.raises(ValueError, match="vocabulary"):
        with_draft_model(str(path), local.cfg.vocab_size + 1)


@pytest.mark.parametrize("push", [False, True], ids=["direct", "push"])
async def test_server_killed_mid_speculation(llama, push):
    path, mid, local, _ = llama
    want = local.generate_greedy(RESTATING, 30)
    with trio.fail_after(120):
        async with swarm("sim", path, [(0, 2), (2, 4), (0, 2), (2, 4)], model_id=mid) as s:
            model = await s.client(push=push, step_timeout=10.0, spot_check=None)
            tokens, g = [], None
            async for ev in model.stream(RESTATING, max_new_tokens=30, stop_token_ids=[],
                                         speculative=oracle(RESTATING, want)):
                if isinstance(ev, Finished):
                    g = ev.generation
                    continue
                tokens.append(ev.token_id)
                if ev.index == 10:  # mid-pass: the rest of this pass's tokens are still to be shown
                    await s.kill(s.server_of(ev.route[1][0]))
            assert tokens == want
            assert g.recoveries >= 1 and g.speculation.accepted > 0


async def test_spot_checks_see_only_kept_positions(llama):
    """Steps checked on a second server, several at a time: rolled-back drafts must not shift the checker's positions
    (a false mismatch would ban an honest server)."""
    path, mid, local, _ = llama
    want = local.generate_greedy(RESTATING, 24)
    with trio.fail_after(120):
        async with swarm("sim", path, [(0, 2), (2, 4), (0, 2), (2, 4)], model_id=mid) as s:
            model = await s.client(spot_check=SpotCheckConfig(fraction=0.3, seed=1))  # checks span several steps
            g = await model.generate(RESTATING, max_new_tokens=24, stop_token_ids=[],
                                     speculative=oracle(RESTATING, want))
            assert g.token_ids == want
            assert g.speculation.accepted < g.speculation.drafted  # there were rollbacks
            assert g.spot_checks["checks"] > 0 and g.spot_checks["mismatches"] == 0
            assert g.recoveries == 0 and not model.sequence.banned()


async def test_rejected_drafts_are_not_billed(llama):
    """Each server's receipt: the kept positions plus at most the last pass's rejected drafts, not every
    token it computed; the client's spends equal the servers' earns."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(RESTATING, 24)
    with trio.fail_after(120):
        async with swarm("sim", path, [], model_id=mid) as s:
            servers = [await add_server(s, a, b, mid=mid, cfg=cfg) for a, b in [(0, 2), (2, 4)]]
            client, model = await add_client(s, mid=mid, cfg=cfg)
            g = await model.generate(RESTATING, max_new_tokens=24, stop_token_ids=[],
                                     speculative=oracle(RESTATING, want))
            assert g.token_ids == want
            x = g.speculation
            computed = len(RESTATING) + x.passes + x.drafted  # every position the servers ran
            kept = len(RESTATING) + len(want) - 1  # the last token is never fed
            assert x.drafted - x.accepted > 2  # rejected drafts in more than the last pass
            with trio.fail_after(10):
                while sum(p.server.billing.stats["earn_entries"] for p in servers) < 2:
                    await trio.sleep(0.05)
            spends = latest_receipts(client.ledger, client.ledger.me, "spend")
            for p in servers:
                assert p.server.stats["tokens"] == computed
                (earn,) = latest_receipts(p.ledger, p.ledger.me, "earn").values()
                assert kept <= earn.tokens <= kept + model.client_config.speculative.max_k < computed
                spend = spends[(earn.server, earn.client, earn.session)]
                assert (spend.tokens, spend.flops, spend.counter) == (earn.tokens, earn.flops, earn.counter)
            assert sum(r.flops for r in g.paid) == sum(r.flops for r in spends.values())


def test_the_generation_summary_reports_speculation():
    """What the answer's `potluck` field and the control socket's `generate` carry (potluck/generation.py)."""
    from pipeline.client import Generation
    from pipeline.speculative import SpeculationStats
    from potluck.generation import GenerationResult

    g = Generation([1, 2, 3, 4, 5], "", "length", 3,
                   speculation=SpeculationStats(passes=2, drafted=6, accepted=2, tokens=4))
    assert GenerationResult(g, "m" * 64, "api").summary()["speculation"] == {
        "passes": 2, "drafted": 6, "accepted": 2, "tokens_per_pass": 2.0, "acceptance": 0.333}
    assert GenerationResult(Generation([1], "", "length", 3), "m" * 64, "api").summary()["speculation"] is None


def test_serve_refuses_a_draft_model_that_is_not_a_model_folder(tmp_path, capsys):
    from potluck.cli import main

    assert main(["serve", "--data-dir", str(tmp_path / "data"), "--draft-model", str(tmp_path)]) == 2
    assert "--draft-model" in capsys.readouterr().err
