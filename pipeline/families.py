"""Per-family adapter: which checkpoint tensors make up block i, the embeddings, the final norm, the LM head.

Llama, Qwen2 and Mistral share HF's tensor layout and differ only in what `ModelConfig` records
(q/k/v biases for Qwen2, sliding windows for Mistral / Qwen2, rope scaling for Llama 3); a family
with other names (or extra norms) gets its own `Family` subclass and an entry in `FAMILY`.
"""

from __future__ import annotations

from .config import ModelConfig

# the short names our Block uses → HF suffix under the block prefix
BLOCK_PARTS = {
    "attn_norm": "input_layernorm.weight",
    "q": "self_attn.q_proj.weight",
    "k": "self_attn.k_proj.weight",
    "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias",
    "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias",
    "o_bias": "self_attn.o_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "gate": "mlp.gate_proj.weight",
    "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight",
    "gate_bias": "mlp.gate_proj.bias",
    "up_bias": "mlp.up_proj.bias",
    "down_bias": "mlp.down_proj.bias",
}


class Family:
    """HF decoder-only layout: model.embed_tokens, model.layers.{i}.*, model.norm, lm_head."""

    embed = "model.embed_tokens.weight"
    norm = "model.norm.weight"
    lm_head = "lm_head.weight"

    def block_prefix(self, i: int) -> str:
        return f"model.layers.{i}."

    def block_parts(self, cfg: ModelConfig, i: int) -> dict[str, str]:
        """Short name → checkpoint tensor name for block i, exactly the tensors that block needs."""
        want = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
        if cfg.qkv_bias:
            want += ["q_bias", "k_bias", "v_bias"]
        if cfg.o_bias:
            want += ["o_bias"]
        if cfg.mlp_bias:
            want += ["gate_bias", "up_bias", "down_bias"]
        p = self.block_prefix(i)
        return {k: p + BLOCK_PARTS[k] for k in want}

    def head_parts(self, cfg: ModelConfig) -> dict[str, str]:
        """Client side: embeddings, final norm and (unless tied to the embeddings) the LM head."""
        parts = {"embed": self.embed, "norm": self.norm}
        if not cfg.tie_word_embeddings:
            parts["lm_head"] = self.lm_head
        return parts

    def shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Expected shape of every short name (block parts and head parts)."""
        h, q, kv, i, v = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size, cfg.vocab_size
        return {"attn_norm": (h,), "mlp_norm": (h,), "q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q),
                "q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,), "o_bias": (h,),
                "gate": (i, h), "up": (i, h), "down": (h, i), "gate_bias": (i,), "up_bias": (i,), "down_bias": (h,),
                "embed": (v, h), "norm": (h,), "lm_head": (v, h)}

    def block_of(self, name: str) -> int | None:
        """Which block a checkpoint tensor belongs to, or None for head tensors."""
        if name.startswith("model.layers."):
            rest = name[len("model.layers."):]
            idx = rest.split(".", 1)[0]
            if idx.isdigit():
                return int(idx)
        return None


LlamaFamily = Qwen2Family = MistralFamily = Family
FAMILY: dict[str, Family] = {"llama": LlamaFamily(), "qwen2": Qwen2Family(), "mistral": MistralFamily()}


def family_of(cfg: ModelConfig) -> Family:
    return FAMILY[cfg.family]


def ignored(name: str) -> bool:
    """Checkpoint entries that carry no weights of ours (old HF checkpoints saved rotary buffers)."""
    return name.endswith("rotary_emb.inv_freq")
