"""What work costs, in FLOPs, for the credit ledger: priced from each model's config, never self-reported.

Every peer that verifies a receipt must price it the same way, so it must know the config of the
model the receipt names. Peers know the default model's config from birth (below, pinned to the
model id it hashes to — a test converts the model and checks both), and register every model they
load. A session's receipt is cumulative, so `tokens` is all tokens the span processed in that
session; attention over t tokens costs the same whether they came as one prefill or t decode steps.
"""

from __future__ import annotations

from .config import ModelConfig
from .flops import span_flops

DEFAULT_MODEL_ID = "2c49f44b91f1f918a0f1ca4e832c97147c7e2676c5fa8432ff91d96adb93e532"
DEFAULT_MODEL_CONFIG = ModelConfig(
    family="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, rms_norm_eps=9.999999747378752e-06,
    max_position_embeddings=8192, tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False,
    rope={"rope_theta": 100000.0, "rope_type": "default"}, sliding_windows=(None,) * 30,
)
MAX_PRICED_TOKENS = 1 << 24


class ModelPricing:
    """`pricing(model_id, start, end, tokens) -> FLOPs` for the models this peer knows."""

    def __init__(self) -> None:
        self._configs: dict[str, ModelConfig] = {DEFAULT_MODEL_ID: DEFAULT_MODEL_CONFIG}

    def register(self, model_id: str, config: ModelConfig) -> None:
        self._configs[model_id] = config

    def knows(self, model_id: str) -> bool:
        return model_id in self._configs

    def __call__(self, model_id: str, start: int, end: int, tokens: int) -> int:
        config = self._configs.get(model_id)
        if config is None:
            raise KeyError(f"no config known for model {model_id[:16]}…; cannot price work on it")
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"blocks [{start}, {end}) are outside the model's {config.num_layers} blocks")
        if not 0 <= tokens <= MAX_PRICED_TOKENS:
            raise ValueError(f"token count {tokens} is out of range")
        return span_flops(config, start, end, tokens)
