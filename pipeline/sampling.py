"""Choosing the next token from logits: greedy, temperature, top-k, top-p, seeded; and stop strings.

`SamplingParams` is what a user asks for (the OpenAI fields map onto it); `Sampler` turns one
logits row into one token id. temperature 0 (the default) is greedy: argmax, no randomness, so a
swarm run equals a local run token for token. With a seed, sampling is reproducible.

Sampling is Gumbel-max with noise drawn per output index (from the seed and the index alone): the
token at index i depends on that position's logits and nothing else — not on how many tokens were
sampled before it in one call or another — so a speculative pass that verifies several positions at
once picks exactly the tokens plain decoding would (pipeline/speculative.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hashlib
import secrets

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # generation ends when the text contains one (cut off before it)
    stop_token_ids: list[int] | None = None  # None = the model's EOS ids

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [vocab] → the log-probabilities sampling draws from (temperature, top-k, top-p
        applied; -inf where a token cannot be drawn). Only for temperature > 0."""
        p = self.params
        logits = logits.detach().to(torch.float32).reshape(-1) / p.temperature
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = probs.cumsum(-1) - probs >= p.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
        return torch.log_softmax(logits, dim=-1)

    def noise(self, index: int, size: int) -> torch.Tensor:
        """Gumbel noise for output index `index`: a function of (seed, index) only."""
        key = hashlib.blake2b(f"{self.seed}:{index}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key, "big") >> 1)
        u = torch.rand(size, generator=g, dtype=torch.float64).clamp_(1e-300, 1.0)
        return -torch.log(-torch.log(u)).to(torch.float32)

    def __call__(self, logits: torch.Tensor, index: int = 0) -> int:
        """logits [vocab] (any float dtype) → the token id at output index `index`."""
        if self.params.greedy:
            return int(logits.detach().reshape(-1).to(torch.float32).argmax())
        scores = self.scores(logits)
        return int((scores + self.noise(index, scores.numel())).argmax())


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string begins in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """How much of `text` can be shown now: not a trailing partial UTF-8 char, nor a tail that
    could still grow into a stop string."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":
        n -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                hold = max(hold, k)
                break
    return n - hold
