"""What work costs, in FLOPs, for the credit ledger: priced from each model's config, never self-reported.

Every peer that verifies a receipt must price it the same way, so it must know the config of the
model the receipt names. Peers know the default model's config from birth (below, pinned to the
model id it hashes to — a test converts the model and checks both), and register every model they
load. A session's receipt is cumulative, so `tokens` is all tokens the span processed in that
session; attention over t tokens costs the same whether they came as one prefill or t decode steps.

A swarm's `PricingPolicy` may weight work by the server's hardware tier (pipeline/tiers.py) and its
precision: a receipt then carries a rate (credits/receipts.py, thousandths) = tier multiplier ×
precision factor, and costs FLOPs × rate / 1000. Every peer of a swarm must use the same policy (as
with its `CreditPolicy`), since every verifier re-prices receipts. `POLICIES`:

    flops   (the default) pure FLOPs: every receipt at rate 1000, exactly as before tiers existed
    tiered  tier multiplier (0.05× … 8×) × precision factor (`PRECISION_FACTORS`: float32 1,
            bfloat16 / float16 0.9, int8 0.6 — fewer bits, less work and a less exact result)

A verifier cannot know a server's tier when the work was done, so it checks only that a receipt's
rate is one the policy can produce (`PricingPolicy.allows`); the server checks it is the one it stated
when the session opened (pipeline/billing.py), and the client that it believes the tier (pipeline/routing.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from credits import RATE_UNIT

from .config import ModelConfig
from .flops import span_flops
from .tiers import MAX_MILLI, MIN_MILLI

DEFAULT_MODEL_ID = "2c49f44b91f1f918a0f1ca4e832c97147c7e2676c5fa8432ff91d96adb93e532"
DEFAULT_MODEL_CONFIG = ModelConfig(
    family="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
    intermediate_size=1536, vocab_size=49152, rms_norm_eps=9.999999747378752e-06,
    max_position_embeddings=8192, tie_word_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False,
    rope={"rope_theta": 100000.0, "rope_type": "default"}, sliding_windows=(None,) * 30,
)
MAX_PRICED_TOKENS = 1 << 24
PRECISION_FACTORS = (("float32", 1.0), ("bfloat16", 0.9), ("float16", 0.9), ("int8", 0.6))


@dataclass(frozen=True)
class PricingPolicy:
    """How a swarm prices a step beyond its FLOPs: by the server's tier multiplier (`by_tier`) and by
    its precision (`precision`: dtype → factor; empty: not weighted; a dtype not listed gets the lowest)."""

    by_tier: bool = False
    precision: tuple[tuple[str, float], ...] = ()

    def rate(self, tier_milli: int, dtype: str) -> int:
        """The rate (thousandths) of a step on a server of multiplier `tier_milli` / 1000 in `dtype`."""
        tier = min(MAX_MILLI, max(MIN_MILLI, tier_milli)) / 1000 if self.by_tier else 1.0
        factors = dict(self.precision)
        factor = factors.get(dtype, min(factors.values())) if factors else 1.0
        return max(1, round(RATE_UNIT * tier * factor))

    @property
    def min_rate(self) -> int:
        return min(self.rate(MIN_MILLI, dtype) for dtype, _ in self.precision or (("float32", 1.0),))

    @property
    def max_rate(self) -> int:
        return max(self.rate(MAX_MILLI, dtype) for dtype, _ in self.precision or (("float32", 1.0),))

    def allows(self, rate: int) -> bool:
        return self.min_rate <= rate <= self.max_rate


FLOPS_POLICY = PricingPolicy()
POLICIES = {"flops": FLOPS_POLICY, "tiered": PricingPolicy(by_tier=True, precision=PRECISION_FACTORS)}


class ModelPricing:
    """`pricing(model_id, start, end, tokens, rate) -> FLOPs × rate / 1000` for the models this peer
    knows, at the rates `policy` allows."""

    def __init__(self, policy: PricingPolicy = FLOPS_POLICY) -> None:
        self.policy = policy
        self._configs: dict[str, ModelConfig] = {DEFAULT_MODEL_ID: DEFAULT_MODEL_CONFIG}

    def register(self, model_id: str, config: ModelConfig) -> None:
        self._configs[model_id] = config

    def knows(self, model_id: str) -> bool:
        return model_id in self._configs

    def __call__(self, model_id: str, start: int, end: int, tokens: int, rate: int = RATE_UNIT) -> int:
        config = self._configs.get(model_id)
        if config is None:
            raise KeyError(f"no config known for model {model_id[:16]}…; cannot price work on it")
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"blocks [{start}, {end}) are outside the model's {config.num_layers} blocks")
        if not 0 <= tokens <= MAX_PRICED_TOKENS:
            raise ValueError(f"token count {tokens} is out of range")
        if not self.policy.allows(rate):
            raise ValueError(f"rate {rate} is outside this swarm's pricing policy [{self.policy.min_rate}, "
                             f"{self.policy.max_rate}]")
        return span_flops(config, start, end, tokens) * rate // RATE_UNIT
