"""Speculative decoding in the client: draft k tokens here, verify them in ONE pass through the route.

    spec = SpeculativeConfig()                          # prompt lookup, k adapted (the client's default)
    drafter, length = spec.drafter(), spec.draft_length()
    drafts = drafter.draft(context, length.next_k())    # context: prompt + tokens accepted so far
    ... one step of [last token, *drafts] → logits at every position ...
    tokens = verify(sampler, logits, drafts, index)     # the tokens plain decoding picks here, 1..k+1
    length.observe(len(drafts), len(tokens) - 1, pass_s)

- Drafter: `PromptLookup` — the longest n-gram (n = ngram_max..1) ending the context that occurred
  before, and the tokens that followed its latest occurrence: no extra model, strong where the
  answer restates its input (edits, summaries, code, RAG); nothing when no n-gram repeats.
- Acceptance (`verify`): the token at each verified position is what `Sampler` picks there —
  argmax when greedy, Gumbel-max with per-index noise when sampling (pipeline/sampling.py) — and
  the drafts are taken while they equal it. Greedy: output identical to plain greedy. Sampling:
  the drafter is deterministic, so its distribution q is a point mass on the draft d, and the
  standard speculative-sampling rule (accept with probability min(1, p(d)/q(d)) = p(d), else draw
  from norm(max(0, p − q)) = p without d) is exactly "x ~ p; accept iff x = d": the distribution is
  the model's, and with a seed the output equals plain decoding's token for token.
- Draft length (`DraftLength`): k maximises expected tokens per unit time, E(k)/(1 + r·k), with
  E(k) = (1 − α^(k+1))/(1 − α) for the measured per-draft acceptance α and r the measured cost of
  one more position in a pass relative to a one-token pass (round trip included: where round trips
  are expensive r is small and k grows). k is 0 while drafts keep failing; as the acceptance
  evidence ages, small drafts are tried again.
- Billing: a pass of 1 + k tokens is paid for before it is computed (pipeline/billing.py); the next
  step's position rolls back the rejected drafts and their tokens are credited back
  (`protocol.refunded_tokens`), so a session is billed its accepted positions plus at most the
  last pass's rejected drafts, which no later step takes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .protocol import MAX_REFUNDED_TOKENS

MAX_DRAFT = MAX_REFUNDED_TOKENS  # drafts per pass: servers credit back at most this many rejected ones


class Drafter(Protocol):
    """Proposes the next tokens of a context (prompt + accepted tokens, append-only within a generation)."""

    def draft(self, context: list[int], k: int) -> list[int]:
        """Up to `k` tokens that may follow `context` (fewer, or none, when it has no guess)."""


class PromptLookup:
    """Drafts by n-gram match in the context (incremental index: n-gram → where its latest occurrence ended)."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._seen: dict[tuple[int, ...], int] = {}  # n-gram → index of the token after its latest occurrence
        self._indexed = 0  # context tokens indexed so far

    def _index(self, context: list[int]) -> None:
        for t in range(max(self._indexed, 1), len(context)):  # the n-grams ending just before token t
            for n in range(self.ngram_min, min(self.ngram_max, t) + 1):
                self._seen[tuple(context[t - n:t])] = t
        self._indexed = max(self._indexed, len(context))

    def draft(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or not context:
            return []
        self._index(context)
        for n in range(min(self.ngram_max, len(context)), self.ngram_min - 1, -1):
            follow = self._seen.get(tuple(context[-n:]))
            if follow is not None:
                return context[follow:follow + k]
        return []


def verify(pick: Callable[[torch.Tensor, int], int], logits: torch.Tensor, drafts: list[int], index: int) -> list[int]:
    """The tokens a pass verified: logits [1 + len(drafts), vocab] are the outputs at the last accepted
    token and at each draft; `pick(row, i)` is the sampler's token at output index i. Returns the drafts
    that equal what `pick` chose, then the first token it chose otherwise (or after the last draft):
    1 to len(drafts) + 1 tokens, each the one plain decoding gives at its index."""
    out: list[int] = []
    for j in range(len(drafts) + 1):
        token = pick(logits[j], index + j)
        out.append(token)
        if j == len(drafts) or token != drafts[j]:
            break
    return out


@dataclass
class DraftLength:
    """k for the next pass, from the measured acceptance and cost of a pass (see the module docstring)."""

    max_k: int = 8
    decay: float = 0.9  # weight of older evidence per pass
    accepted: float = 0.0  # decayed counts of drafts accepted / rejected
    rejected: float = 0.0
    base_s: float | None = None  # decayed estimate of a one-token pass (s)
    per_token_s: float | None = None  # ... and of one more position in a pass
    prior_cost: float = 0.1  # r before anything is measured

    def __post_init__(self) -> None:
        if not 0 <= self.max_k <= MAX_DRAFT:
            raise ValueError(f"max_k must be in [0, {MAX_DRAFT}]")

    @property
    def acceptance(self) -> float:
        """α: the chance a draft is accepted given the ones before it were (Laplace-smoothed)."""
        return (self.accepted + 1.0) / (self.accepted + self.rejected + 2.0)

    @property
    def relative_cost(self) -> float:
        """r: one more position in a pass, relative to a one-token pass."""
        if self.base_s is None or self.per_token_s is None or self.base_s <= 0:
            return self.prior_cost
        return min(1.0, max(1e-3, self.per_token_s / self.base_s))

    def next_k(self) -> int:
        a, r = min(self.acceptance, 0.999), self.relative_cost
        best, best_rate = 0, 1.0
        for k in range(1, self.max_k + 1):
            rate = (1.0 - a ** (k + 1)) / (1.0 - a) / (1.0 + r * k)
            if rate > best_rate * 1.0001:
                best, best_rate = k, rate
        return best

    def observe(self, drafted: int, accepted: int, pass_s: float) -> None:
        """A pass of 1 + `drafted` positions took `pass_s` and accepted `accepted` drafts."""
        d = self.decay
        self.accepted *= d
        self.rejected *= d
        if drafted:
            self.accepted += accepted
            self.rejected += accepted < drafted
        if not math.isfinite(pass_s) or pass_s <= 0:
            return
        if drafted == 0:
            self.base_s = pass_s if self.base_s is None else d * self.base_s + (1 - d) * pass_s
        elif self.base_s is not None:
            slope = max(0.0, pass_s - self.base_s) / drafted
            self.per_token_s = slope if self.per_token_s is None else d * self.per_token_s + (1 - d) * slope


@dataclass
class SpeculativeConfig:
    """Speculative decoding for a client (`ClientConfig.speculative`) or one generation (`speculative=`)."""

    max_k: int = 8  # most drafts a pass
    ngram_max: int = 3
    ngram_min: int = 1
    make_drafter: Callable[[], Drafter] | None = None  # another drafter (one per generation); None: prompt lookup

    def drafter(self) -> Drafter:
        if self.make_drafter is not None:
            return self.make_drafter()
        return PromptLookup(self.ngram_max, self.ngram_min)

    def draft_length(self) -> DraftLength:
        return DraftLength(max_k=self.max_k)


@dataclass
class SpeculationStats:
    """How a generation's passes went (`Generation.speculation`)."""

    passes: int = 0  # decode passes through the route
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens the passes produced (accepted drafts + one of the model's own each)

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def summary(self) -> dict:
        return {"passes": self.passes, "drafted": self.drafted, "accepted": self.accepted,
                "tokens_per_pass": round(self.tokens_per_pass, 3), "acceptance": round(self.acceptance, 3)}
