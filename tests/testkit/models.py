"""Tiny random-weight HF models for the model and pipeline tests (the shared `llama` fixtures are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=101, max_position_embeddings=64, rms_norm_eps=1e-5)


def tiny_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if family == "llama":
        # llama3 rope scaling with a short original context, so every branch of its formula is used
        return LlamaConfig(**TINY, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "mistral":
        return MistralConfig(**TINY, tie_word_embeddings=False, sliding_window=5,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    raise ValueError(family)


def make_tiny(family: str, path: Path, *, seed: int = 0, shard: bool = False):
    """Build a random HF model of `family`, save it to `path` as safetensors, return it (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))  # large enough that attention is far from uniform
    model.save_pretrained(path, max_shard_size="60KB" if shard else "5GB")
    return model


def have_default_model_wheel() -> bool:
    """Whether the wheel carrying the default model's GGUF is installed (scripts/setup.sh installs it)."""
    from pipeline.convert import DefaultModelMissing, find_default_gguf

    try:
        find_default_gguf()
        return True
    except DefaultModelMissing:
        return False
