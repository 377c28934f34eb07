"""Model configuration: the few numbers of an HF `config.json` that our block math needs.

`ModelConfig.from_dict` normalises the three supported families (Llama, Qwen2, Mistral) and both
spellings of rotary settings (`rope_theta` + `rope_scaling` of transformers 4.x, `rope_parameters`
of 5.x) into one frozen dataclass. `canonical()` is the form hashed into the model id, so two
config.json files that differ only in bookkeeping (transformers_version, dtype name, ...) agree.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")


class ModelConfigError(ValueError):
    """config.json is missing, malformed, or describes a model we cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta, + type-specific keys
    sliding_windows: tuple[int | None, ...] = ()  # per layer: window size or None (full attention)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ModelConfigError("config.json must hold a JSON object")
        family = d.get("model_type")
        if family not in FAMILIES:
            raise ModelConfigError(f"model_type {family!r} is not supported; supported: {', '.join(FAMILIES)}")

        def need(key: str, typ=int):
            v = d.get(key)
            if not isinstance(v, typ) or isinstance(v, bool) or (typ is int and v <= 0):
                raise ModelConfigError(f"config.json: {key} must be a positive {typ.__name__}, got {v!r}")
            return v

        hidden = need("hidden_size")
        layers = need("num_hidden_layers")
        heads = need("num_attention_heads")
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or hidden // heads
        if heads % kv_heads:
            raise ModelConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ModelConfigError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")

        # rotary settings: 5.x rope_parameters, else 4.x rope_theta + rope_scaling
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "full_attention" in rp:  # per-layer-type form: all our families share one
            rp = rp["full_attention"]
        if isinstance(rp, dict):
            rope = dict(rp)
        else:
            rope = dict(d.get("rope_scaling") or {})
            rope["rope_theta"] = d.get("rope_theta", 10000.0)
        rope_type = rope.pop("type", None) or rope.get("rope_type") or "default"
        rope["rope_type"] = rope_type
        rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        rope["rope_theta"] = float(rope["rope_theta"])
        if "partial_rotary_factor" in d:
            rope.setdefault("partial_rotary_factor", d["partial_rotary_factor"])
        if rope_type not in SUPPORTED_ROPE:
            raise ModelConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE)}")
        if rope_type in ("yarn", "llama3"):
            rope.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))

        # attention window per layer
        window = d.get("sliding_window")
        if family == "mistral":
            windows = tuple([window] * layers)
        elif family == "qwen2":
            types = d.get("layer_types")
            if not d.get("use_sliding_window", False):
                window = None
            if types and window is not None:
                windows = tuple(window if t == "sliding_attention" else None for t in types)
            else:
                mwl = d.get("max_window_layers", layers)
                windows = tuple(window if (window is not None and i >= mwl) else None for i in range(layers))
        else:
            windows = tuple([None] * layers)
        if len(windows) != layers:
            raise ModelConfigError("config.json: layer_types does not have one entry per layer")

        if family == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        elif family == "llama":
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        else:
            qkv_bias = o_bias = mlp_bias = False

        return cls(
            family=family,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            rope=rope,
            sliding_windows=windows,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
        )

    @classmethod
    def load(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelConfigError(f"{path} does not exist: not a Hugging Face model folder") from None
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def canonical(self) -> dict:
        """What the model computes, as plain JSON (token ids excluded: they do not change any block)."""
        d = asdict(self)
        d.pop("bos_token_id")
        d.pop("eos_token_id")
        d["sliding_windows"] = list(self.sliding_windows)
        d["rope"] = dict(sorted(self.rope.items()))
        return d
