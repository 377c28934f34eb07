"""Speculative decoding in the client: draft k tokens here, verify them in ONE pass through the route.

    spec = SpeculativeConfig()                          # prompt lookup, k adapted (the client's default)
    drafter, length = spec.drafter(), spec.draft_length()
    drafts = await drafter.draft(context, length.next_k())  # context: prompt + tokens accepted so far
    ... one step of [last token, *drafts] → logits at every position ...
    tokens = verify(sampler, logits, drafts, index)     # the tokens plain decoding picks here, 1..k+1
    length.observe(len(drafts), len(tokens) - 1, pass_s)

- Drafters: `PromptLookup` (the default) — the longest n-gram (n = ngram_max..1) ending the context
  that occurred before, and the tokens that followed its latest occurrence: no extra model, strong
  where the answer restates its input (edits, summaries, code, RAG); nothing when no n-gram repeats.
  `DraftModel` — a small local model of the same tokenizer drafting greedily (`--draft-model`).
- Acceptance (`verify`): the token at each verified position is what `Sampler` picks there —
  argmax when greedy, Gumbel-max with per-index noise when sampling (pipeline/sampling.py) — and
  the drafts are taken while they equal it. Greedy: output identical to plain greedy. Sampling:
  the drafter is deterministic, so its distribution q is a point mass on the draft d, and the
  standard speculative-sampling rule (accept with probability min(1, p(d)/q(d)) = p(d), else draw
  from norm(max(0, p − q)) = p without d) is exactly "x ~ p; accept iff x = d": the distribution is
  the model's, and with a seed the output equals plain decoding's token for token.
- Draft length (`DraftLength`): k maximises expected tokens per unit time, E(k)/(1 + r·k), with
  E(k) = (1 − α^(k+1))/(1 − α) for the measured per-draft acceptance α and r the measured cost of
  one more position in a pass relative to a one-token pass (a line a + b·positions through the
  timed passes, r = b/(a + b): the round trip is in a, so where round trips are expensive r is
  small and k grows). k is 0 while drafts keep failing; as the acceptance evidence ages, small
  drafts are tried again.
- Billing: a pass of 1 + k tokens is paid for before it is computed (pipeline/billing.py); the next
  step's position rolls back the rejected drafts and their tokens are credited back
  (`protocol.refunded_tokens`), so a session is billed its accepted positions plus at most the
  last pass's rejected drafts, which no later step takes back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
import trio

from .loading import load_local_model
from .model import LocalModel, LocalSession
from .protocol import MAX_REFUNDED_TOKENS

MAX_DRAFT = MAX_REFUNDED_TOKENS  # drafts per pass: servers credit back at most this many rejected ones


class Drafter(Protocol):
    """Proposes the next tokens of a context (prompt + accepted tokens, append-only within a generation)."""

    async def draft(self, context: list[int], k: int) -> list[int]:
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

    async def draft(self, context: list[int], k: int) -> list[int]:
        return self.lookup(context, k)

    def lookup(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or not context:
            return []
        self._index(context)
        for n in range(min(self.ngram_max, len(context)), self.ngram_min - 1, -1):
            follow = self._seen.get(tuple(context[-n:]))
            if follow is not None:
                return context[follow:follow + k]
        return []


class DraftModel:
    """Drafts greedily with a small local model of the same tokenizer (`LocalModel`: our block math, all
    blocks in this process), in a worker thread; its KV cache keeps what the drafts share with the
    context and rolls back the rest. A point mass too: `verify`'s rule holds as it is."""

    def __init__(self, model: LocalModel, capacity: int = 4096):
        self.model = model
        self.capacity = capacity
        self.session: LocalSession | None = None  # allocated at the first draft
        self.cached: list[int] = []  # the tokens the draft cache holds

    async def draft(self, context: list[int], k: int) -> list[int]:
        if k <= 0 or not context or len(context) + k > self.capacity:
            return []
        return await trio.to_thread.run_sync(self._draft, list(context), k)

    def _draft(self, context: list[int], k: int) -> list[int]:
        if self.session is None:
            self.session = self.model.new_session(self.capacity)
        same = 0
        for a, b in zip(self.cached, context):
            if a != b:
                break
            same += 1
        same = min(same, len(context) - 1)  # the last context token is fed again: its logits start the draft
        for cache in self.session.caches:
            cache.trim(same)
        logits = self.model.step(torch.tensor([context[same:]]), self.session)
        self.cached = list(context)
        out: list[int] = []
        while True:
            out.append(int(logits[0, -1].argmax()))
            if len(out) == k:
                return out
            logits = self.model.step(torch.tensor([out[-1:]]), self.session)
            self.cached.append(out[-1])


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
    prior_cost: float = 0.1  # r until passes of different sizes were timed
    measure: bool = True  # False: r stays `prior_cost` (k then follows the acceptance alone)
    # decayed sums for a least-squares line through (positions in a pass, its seconds): a + b·positions
    _w: float = field(default=0.0, init=False, repr=False)
    _sx: float = field(default=0.0, init=False, repr=False)
    _sy: float = field(default=0.0, init=False, repr=False)
    _sxx: float = field(default=0.0, init=False, repr=False)
    _sxy: float = field(default=0.0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.max_k <= MAX_DRAFT:
            raise ValueError(f"max_k must be in [0, {MAX_DRAFT}]")

    @property
    def acceptance(self) -> float:
        """α: the chance a draft is accepted given the ones before it were (Laplace-smoothed)."""
        return (self.accepted + 1.0) / (self.accepted + self.rejected + 2.0)

    @property
    def relative_cost(self) -> float:
        """r: one more position in a pass, relative to a one-token pass (round trip included): b / (a + b)."""
        if not self.measure or self._w <= 0:
            return self.prior_cost
        mx, my = self._sx / self._w, self._sy / self._w
        var = self._sxx / self._w - mx * mx
        if var < 0.25:  # passes of (nearly) one size: the line is not determined
            return self.prior_cost
        b = max(0.0, (self._sxy / self._w - mx * my) / var)
        a = my - b * mx
        return min(1.0, max(1e-3, b / (a + b))) if a + b > 0 else 1.0

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
        n = 1 + drafted
        self._w = d * self._w + 1.0
        self._sx = d * self._sx + n
        self._sy = d * self._sy + pass_s
        self._sxx = d * self._sxx + n * n
        self._sxy = d * self._sxy + n * pass_s


@dataclass
class SpeculativeConfig:
    """Speculative decoding for a client (`ClientConfig.speculative`) or one generation (`speculative=`)."""

    max_k: int = 8  # most drafts a pass
    ngram_max: int = 3
    ngram_min: int = 1
    make_drafter: Callable[[], Drafter] | None = None  # another drafter (one per generation); None: prompt lookup
    position_cost: float | None = None  # r, fixed (e.g. servers whose extra positions are nearly free); None: measured

    def drafter(self) -> Drafter:
        if self.make_drafter is not None:
            return self.make_drafter()
        return PromptLookup(self.ngram_max, self.ngram_min)

    def draft_length(self) -> DraftLength:
        if self.position_cost is not None:
            return DraftLength(max_k=self.max_k, prior_cost=self.position_cost, measure=False)
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


def with_draft_model(folder: str, vocab_size: int, **kw: Any) -> SpeculativeConfig:
    """Speculation drafting with the model in `folder` (loaded whole, here: call it in a thread); ValueError
    unless its vocabulary has the target's size (a cheap check that the tokenizer is the same)."""
    local = load_local_model(folder, device="cpu")
    if local.cfg.vocab_size != vocab_size:
        raise ValueError(f"the draft model's vocabulary has {local.cfg.vocab_size} tokens, the model's "
                         f"{vocab_size}: a draft model must share the tokenizer")
    return SpeculativeConfig(make_drafter=lambda: DraftModel(local), **kw)
