"""Our block math (spans + explicit KV cache) against transformers' own Llama / Qwen2 / Mistral."""

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.loading import ModelFolder, load_head, load_local_model, load_span
from pipeline.model import CacheError
from testkit.models import make_tiny

FAMILIES = ["llama", "qwen2", "mistral"]
SPANS = [(0, 1), (1, 3), (3, 4)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny(request.param, path, shard=request.param == "qwen2")
    return request.param, path, model


def test_prefill_then_decode_matches_hf(tiny):
    family, path, hf = tiny
    torch.manual_seed(1)
    ids = torch.randint(0, 101, (2, 13))  # batch 2; 13 > Mistral's window of 5
    with torch.no_grad():
        want = hf(ids).logits
    ours = load_local_model(path, SPANS, device="cpu")
    session = ours.new_session(capacity=16, batch=2)
    got = [ours.step(ids[:, :4], session)]  # prefill 4 (inside Mistral's window) ...
    got.append(ours.step(ids[:, 4:7], session))  # ... a 3-token chunk at an offset (replay, chunked prefill) ...
    for t in range(7, 13):  # ... then one token at a time, past the window
        got.append(ours.step(ids[:, t:t + 1], session))
    got = torch.cat(got, dim=1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert session.length == 13


def test_greedy_tokens_identical(tiny):
    family, path, hf = tiny
    prompt = torch.tensor([[5, 17, 42, 8, 99, 3]])
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = load_local_model(path, [(0, 2), (2, 4)], device="cpu")
    got = ours.generate_greedy(prompt[0].tolist(), 12)
    assert got == want[0, prompt.shape[1]:].tolist()


def test_span_reads_only_its_tensors(tiny):
    family, path, _ = tiny
    mf = ModelFolder(path)
    span = load_span(mf, 1, 3, device="cpu")
    assert span.loaded_tensors and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in span.loaded_tensors)
    assert {n.split(".")[2] for n in span.loaded_tensors} == {"1", "2"}
    assert set(span.loaded_tensors) == set(mf.block_tensor_names(1) + mf.block_tensor_names(2))
    head = load_head(path, device="cpu")
    want = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if family != "llama" else set())
    assert set(head.loaded_tensors) == want


def test_config_parsing(tiny):
    family, path, _ = tiny
    cfg = ModelConfig.load(path)
    assert cfg.family == family and cfg.num_layers == 4 and cfg.head_dim == 16 and cfg.num_kv_heads == 2
    assert cfg.qkv_bias == (family == "qwen2")
    assert cfg.sliding_windows == ((5,) * 4 if family == "mistral" else (None,) * 4)
    assert cfg.tie_word_embeddings == (family == "llama")
    assert cfg.rope["rope_type"] == ("llama3" if family == "llama" else "default")


def test_cache_rollback_and_errors(tmp_path):
    make_tiny("llama", tmp_path)
    span = load_span(tmp_path, 0, 4, device="cpu")
    cache = span.new_cache(capacity=8)
    x = torch.randn(1, 6, 64)
    full = span.forward(x, cache)
    # re-running the last two positions after a rollback gives the same output
    again = span.forward(x[:, 4:], cache, position=4)
    torch.testing.assert_close(again, full[:, 4:], rtol=1e-5, atol=1e-5)
    assert cache.length == 6
    with pytest.raises(CacheError, match="exceed"):
        span.forward(torch.randn(1, 3, 64), cache)
    with pytest.raises(CacheError, match="past the cache"):
        span.forward(torch.randn(1, 1, 64), cache, position=7)
    with pytest.raises(CacheError, match="hidden states"):
        span.forward(torch.randn(1, 1, 32), cache)
    assert cache.nbytes == span.cache_bytes(8) == 2 * 4 * 2 * 8 * 16 * 4


def test_bfloat16_runs(tmp_path):
    hf = make_tiny("qwen2", tmp_path)
    ours = load_local_model(tmp_path, dtype="bfloat16", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    s = ours.new_session(4)
    got = ours.step(ids, s).float()
    with torch.no_grad():
        want = hf(ids).logits
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_states_wire_round_trip(dtype):
    from p2p.errors import FrameError
    from p2p.framing import decode, encode
    from pipeline.protocol import dtype_name, pack_hidden, unpack_hidden

    name = dtype_name(dtype)
    h = torch.randn(1, 3, 64).to(dtype)
    back = unpack_hidden(decode(encode(pack_hidden(h))), dtype=name, hidden_size=64)
    assert back.dtype == dtype and torch.equal(back, h)
    with pytest.raises(FrameError, match="shape"):
        unpack_hidden(pack_hidden(h), dtype=name, hidden_size=32)
    with pytest.raises(FrameError, match="longer"):
        unpack_hidden(pack_hidden(h), dtype=name, hidden_size=64, max_tokens=2)
    bad = pack_hidden(h)
    bad["data"] = bad["data"][:-1]
    with pytest.raises(FrameError, match="bytes"):
        unpack_hidden(bad, dtype=name, hidden_size=64)


def test_span_throughput_probe(tiny):
    from pipeline.measure import span_throughput

    _, path, _ = tiny
    r = span_throughput(load_span(path, 0, 4, device="cpu"), prefill_tokens=8, decode_steps=2, repeats=1)
    assert r["blocks"] == 4 and r["prefill_tokens_per_s_per_block"] > 0 and r["decode_tokens_per_s_per_block"] > 0


def test_wrong_shapes_and_missing_tensors_are_clear_errors(tmp_path):
    import json

    from pipeline.loading import WeightsError

    make_tiny("qwen2", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the checkpoint says 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"mlp.gate_proj.weight has shape \[96, 64\], config.json implies \[128, 64\]"):
        load_span(tmp_path, 0, 1, device="cpu")
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 5  # a block the checkpoint does not have
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="lacks model.layers.4"):
        load_span(tmp_path, 3, 5, device="cpu")
    with pytest.raises(ValueError, match="outside"):
        load_span(tmp_path, 3, 9, device="cpu")
