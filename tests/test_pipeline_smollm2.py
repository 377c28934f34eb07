"""SmolLM2-135M-Instruct through 3 servers on real libp2p sockets: greedy text equals transformers'
local `generate`; the chat template and stop strings work (a held-back tail still arrives on EOS); a
server's peak RSS is a fraction of the full model's (the multi-process version lives in
bench/pipeline.py and the lead's CLI tests)."""

import pytest
import torch
import trio

from pipeline import convert
from testkit.models import have_default_model_wheel
from testkit.swarms import swarm

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def smollm2(smollm2_data):
    if not have_default_model_wheel():
        pytest.skip(convert.INSTALL_HINT)
    _, folder = smollm2_data
    from pipeline.identity import model_id

    return folder, model_id(folder)


async def test_smollm2_swarm_equals_local_hf(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, mid = smollm2
    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    want_ids = out[0, len(ids):].tolist()
    want_text = tok.decode(want_ids, skip_special_tokens=True)
    del hf
    with trio.fail_after(300):
        async with swarm("libp2p", folder, [(0, 10), (10, 20), (20, 30)], model_id=mid) as s:
            model = await s.client()
            g = await model.chat(MESSAGES, max_new_tokens=24)
            assert g.text == want_text and "Paris" in g.text
            assert g.token_ids == [t for t in want_ids if t != tok.eos_token_id]
            streamed = []
            async for ev in model.stream(MESSAGES, max_new_tokens=24, stop=["Paris"]):
                streamed.append(ev.text)
            assert "".join(streamed) == want_text[:want_text.index("Paris")]
            # The start of a possible stop string is held back until it is known; when the answer ends
            # on EOS instead, the stream's last event still carries it.
            assert g.finish_reason == "stop"  # EOS
            never = want_text[-1] + "\u2603 never"
            events = [ev async for ev in model.stream(MESSAGES, max_new_tokens=24, stop=[never])]
            assert "".join(ev.text for ev in events) == want_text == events[-1].generation.text
            assert events[-1].text.endswith(want_text[-1]) and events[-1].generation.finish_reason == "stop"
