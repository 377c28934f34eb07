"""FLOP cost of one decoder block per token, from the config alone (credits price work with it).

Counting rule: a multiply-add is 2 FLOPs; only matrix products are counted (norms, rotary,
softmax, SiLU and biases are O(hidden) per token, < 1% for any real model, and left out so the
formula stays easy to check by hand and to agree on).

Per block, per token at position p (0-based; it attends to `ctx(p) = min(p + 1, window)` positions):

    linear     = 2·h·(nh·hd)            q projection
               + 2·2·h·(nkv·hd)         k and v projections
               + 2·(nh·hd)·h            o projection
               + 3·2·h·I                gate, up, down (SwiGLU)
    attention  = 2·2·nh·hd·ctx(p)       scores q·kᵀ, then weights·v
    flops(p)   = linear + attention

Prefill of n tokens after `past` cached ones costs Σ flops(p) for p in [past, past + n); decode
is the n = 1 case. `head_flops` is the client's LM head (2·h·V per token). `tier_flops_per_token`
is what a prefill token/s through a block is worth in FLOP/s: the figure that places a server in a
hardware tier (pipeline/server.py) and that clients check its announcement against (pipeline/routing.py).
"""

from __future__ import annotations

from .config import ModelConfig


def linear_flops_per_token(cfg: ModelConfig) -> int:
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return 2 * h * q + 2 * 2 * h * kv + 2 * q * h + 3 * 2 * h * inter


def attention_flops(cfg: ModelConfig, context: int) -> int:
    """Attention matmuls of one query token over `context` keys, in one block."""
    return 4 * cfg.num_heads * cfg.head_dim * context


def _ctx_sum(first: int, last: int, window: int | None) -> int:
    """Σ min(p + 1, window) for p in [first, last)."""
    if last <= first:
        return 0

    def tri(a: int, b: int) -> int:  # Σ (p + 1) for p in [a, b)
        return (b * (b + 1) - a * (a + 1)) // 2

    if window is None:
        return tri(first, last)
    cut = max(first, min(last, window))  # min(p + 1, window) = p + 1 exactly when p < window
    return tri(first, cut) + (last - cut) * window


def block_flops(cfg: ModelConfig, new_tokens: int, past_tokens: int = 0, block: int = 0) -> int:
    """FLOPs for one block to process `new_tokens` after `past_tokens` already cached."""
    if new_tokens < 0 or past_tokens < 0:
        raise ValueError("token counts must be non-negative")
    window = cfg.sliding_windows[block] if cfg.sliding_windows else None
    ctx = _ctx_sum(past_tokens, past_tokens + new_tokens, window)
    return new_tokens * linear_flops_per_token(cfg) + 4 * cfg.num_heads * cfg.head_dim * ctx


def decode_flops(cfg: ModelConfig, position: int, block: int = 0) -> int:
    """One generated token at `position` (= tokens already cached), one block."""
    return block_flops(cfg, 1, position, block)


def prefill_flops_per_token(cfg: ModelConfig, n: int, block: int = 0) -> float:
    """Average per-token cost of a prefill of n tokens from an empty cache, one block."""
    return block_flops(cfg, n, 0, block) / n if n else 0.0


TIER_PREFILL_TOKENS = 64  # the prefill a server's start-up measurement times (pipeline/server.py)


def tier_flops_per_token(cfg: ModelConfig, block: int, tokens: int = TIER_PREFILL_TOKENS) -> float:
    """FLOPs per token of a `tokens`-token prefill through `block` from an empty cache: what a measured
    prefill tokens/s through that block is worth in FLOP/s."""
    return prefill_flops_per_token(cfg, tokens, block)


def span_flops(cfg: ModelConfig, start: int, end: int, new_tokens: int, past_tokens: int = 0) -> int:
    """Blocks [start, end) together (windows may differ per block)."""
    return sum(block_flops(cfg, new_tokens, past_tokens, b) for b in range(start, end))


def head_flops(cfg: ModelConfig, tokens: int = 1) -> int:
    return 2 * cfg.hidden_size * cfg.vocab_size * tokens
