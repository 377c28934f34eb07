"""A swarm of BlockServers gives the local model's logits and greedy tokens — on the simulator and on
real libp2p sockets, for tiny random Llama / Qwen2 / Mistral; spans overlap and get cut."""

import pytest
import torch
import trio

from pipeline.identity import model_id
from testkit.models import make_tiny
from testkit.swarms import swarm

FAMILIES = ["llama", "qwen2", "mistral"]
SPANS = [(0, 2), (2, 4), (0, 3), (1, 4)]  # overlapping replicas; (0, 3) and (1, 4) alone need a cut
PROMPT = [5, 17, 42, 8, 99, 3, 61, 7]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, path, shard=request.param == "qwen2")
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want_greedy = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
        seq = want_greedy  # prompt + 10 tokens: 18 > Mistral's window of 5
        want_logits = hf(seq).logits
    return request.param, path, model_id(path), want_logits, seq[0].tolist(), want_greedy[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("backend", ["sim", "libp2p"])
async def test_swarm_matches_local(tiny, backend):
    family, path, mid, want_logits, seq, want_tokens = tiny
    with trio.fail_after(60):
        async with swarm(backend, path, SPANS, model_id=mid) as s:
            model = await s.client()
            # prefill in chunks of 5, through one session
            got = await model.forward(seq, chunk=5)
            torch.testing.assert_close(got, want_logits, rtol=1e-5, atol=1e-5)
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want_tokens
            assert g.finish_reason == "length" and len(g.route) >= 2
            # with server-to-server forwarding, the same tokens
            model.client_config.push = True
            g2 = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g2.token_ids == want_tokens and g2.push_fallbacks == 0


async def test_cut_spans_only(tiny):
    """Only (0, 3) and (1, 4) exist: every route cuts one of them."""
    family, path, mid, want_logits, seq, want_tokens = tiny
    if family != "llama":
        pytest.skip("one family is enough")
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 3), (1, 4)], model_id=mid) as s:
            model = await s.client()
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want_tokens
            spans = [(a, b) for _, a, b in g.route]
            assert spans in ([(0, 3), (3, 4)], [(0, 1), (1, 4)])
