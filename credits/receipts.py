"""Receipts: what a client signs for a server, cumulative per inference session.

A receipt says "client C received, from server S, in session X, the work of blocks [start, end) of
model M over `tokens` tokens in total, worth `flops` FLOPs; this is my `counter`-th receipt to S in
X". The client signs msgpack([DOMAIN, server, client, model, start, end, tokens, flops, session,
counter]) — a fixed-order list, domain-separated from entry signatures.

A receipt may carry a price `rate` in thousandths (`RATE_UNIT` = 1000 is 1×: pure FLOPs): `flops` is
then the FLOPs times rate / 1000, what a swarm's pricing policy weights a server's work by (its
hardware tier and precision, pipeline/pricing.py). A receipt at the unit rate is encoded and signed
exactly as before (10 fields); any other rate adds it as an 11th field, signed with the rest. The
rate is fixed per session: the same receipt is the server's earn and the client's spend, so what the
client pays is exactly what the server earns at whatever rate they agreed.

Every verifier checks the client's signature and RECOMPUTES `flops` from (model, start, end, tokens)
with the pricing function it was given (the pipeline layer derives it from the model config), so a
receipt cannot be inflated by either party. Receipts are cumulative: per (client, session, server)
only the highest-counter receipt counts, so replaying an old one earns nothing, and a server's chain
may only carry receipts of strictly increasing counter per (client, session) (see credits.ledger).

In a session (the pipeline's job; the classes below are its tools):
- the client keeps a `ReceiptSigner` per server hop and, after each step, signs a receipt that
  covers every token the server has processed so far;
- the server keeps a `ReceiptTracker` and serves step k+1 only once `tracker.covered_tokens` is
  at least what it served up to step k (`tracker.require(...)`), so what it risks is one step;
- at the end (or periodically) the server appends `tracker.latest` to its chain as an *earn* entry
  (`Ledger.record_earn`), and the client appends the same receipt as a *spend* (`Ledger.record_spend`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Protocol

import msgpack

from p2p.identity import Identity, peer_id_from_public_key

from .entry import KEY_LEN, MAX_INT, SIG_LEN, sha256, verify_signature
from .errors import InvalidReceipt

DOMAIN = "potluck/receipt/1"
MAX_MODEL_LEN = 200
MAX_BLOCK = 1 << 16
MAX_TOKENS = 1 << 40
SESSION_MIN, SESSION_MAX = 8, 32
RATE_UNIT = 1000  # a receipt's rate in thousandths: 1000 prices pure FLOPs
MAX_RATE = 1000 * RATE_UNIT


class Pricing(Protocol):
    """`pricing(model_id, block_start, block_end, tokens, rate) -> FLOPs` (an int). Raise (KeyError, ValueError)
    for a model it cannot price, or a rate its policy does not allow: such a receipt cannot be verified
    and is refused.

    `tokens` is cumulative: every position the server has processed in this session (prompt + generated),
    so the price of a session is that of one prefill of `tokens` from an empty cache. With the model
    layer: pipeline.pricing.ModelPricing, `span_flops(config, a, b, t)` times the rate (attention grows with
    context, so this is not linear in `tokens`; cumulative receipts price it exactly all the same)."""

    def __call__(self, model: str, start: int, end: int, tokens: int, rate: int = RATE_UNIT, /) -> int: ...


def linear_pricing(flops_per_block_token: dict[str, int] | Callable[[str], int]) -> Pricing:
    """Pricing where every block of a model costs the same per token (what a decoder's dense part
    costs: ~2 × parameters of the block). `flops_per_block_token` maps model id → FLOPs per block per token."""

    def pricing(model: str, start: int, end: int, tokens: int, rate: int = RATE_UNIT) -> int:
        if rate != RATE_UNIT:
            raise ValueError("linear pricing prices pure FLOPs: rate 1000 only")
        per = flops_per_block_token(model) if callable(flops_per_block_token) else flops_per_block_token[model]
        return int(per) * (end - start) * tokens

    return pricing


def new_session_id() -> bytes:
    return os.urandom(16)


@dataclass(frozen=True)
class Receipt:
    server: bytes
    client: bytes
    model: str
    start: int
    end: int
    tokens: int
    flops: int
    session: bytes
    counter: int
    signature: bytes
    rate: int = RATE_UNIT

    @classmethod
    def sign(cls, identity: Identity, *, server: bytes, model: str, start: int, end: int, tokens: int,
             flops: int, session: bytes, counter: int, rate: int = RATE_UNIT) -> "Receipt":
        """The client (`identity`) signs a receipt for `server`."""
        _check_fields(server, identity.public_key, model, start, end, tokens, flops, session, counter, rate)
        msg = _message(server, identity.public_key, model, start, end, tokens, flops, session, counter, rate)
        return cls(server, identity.public_key, model, start, end, tokens, flops, session, counter,
                   identity.sign(msg), rate)

    @classmethod
    def from_list(cls, obj: Any) -> "Receipt":
        """Strictly read a decoded receipt (untrusted); the signature is checked by `verify`."""
        if not isinstance(obj, list) or len(obj) not in (10, 11):
            raise InvalidReceipt("a receipt is a list of 10 fields (11 with a rate)")
        server, client, model, start, end, tokens, flops, session, counter, signature = obj[:10]
        rate = obj[10] if len(obj) == 11 else RATE_UNIT
        if len(obj) == 11 and rate == RATE_UNIT:  # one encoding per receipt: the unit rate is never written
            raise InvalidReceipt("a receipt at the unit rate has 10 fields")
        _check_fields(server, client, model, start, end, tokens, flops, session, counter, rate)
        if not isinstance(signature, bytes) or len(signature) != SIG_LEN:
            raise InvalidReceipt("receipt signature must be 64 bytes")
        return cls(server, client, model, start, end, tokens, flops, session, counter, signature, rate)

    def to_list(self) -> list:
        fields = [self.server, self.client, self.model, self.start, self.end, self.tokens, self.flops,
                  self.session, self.counter, self.signature]
        return fields if self.rate == RATE_UNIT else fields + [self.rate]

    @cached_property
    def message(self) -> bytes:
        return _message(self.server, self.client, self.model, self.start, self.end, self.tokens, self.flops,
                        self.session, self.counter, self.rate)

    @property
    def key(self) -> tuple[bytes, bytes, bytes]:
        """What replay protection is keyed on: (client, session, server)."""
        return (self.client, self.session, self.server)

    def verify(self, pricing: Pricing) -> None:
        """Raise InvalidReceipt unless the client signed it and `flops` is what `pricing` says at its rate."""
        if not verify_signature(self.client, self.message, self.signature, memo_key=sha256(self.message)):
            raise InvalidReceipt(f"receipt not signed by its client {peer_id_from_public_key(self.client)}")
        try:
            expected = pricing(self.model, self.start, self.end, self.tokens, self.rate)
        except (KeyError, ValueError, LookupError) as e:
            raise InvalidReceipt(f"cannot price model {self.model!r} at rate {self.rate}: {e}") from None
        if expected != self.flops:
            raise InvalidReceipt(
                f"receipt claims {self.flops} FLOPs but {self.tokens} tokens through blocks "
                f"[{self.start}, {self.end}) of {self.model!r} at rate {self.rate} cost {expected}")


def _message(server, client, model, start, end, tokens, flops, session, counter, rate) -> bytes:
    fields = [DOMAIN, server, client, model, start, end, tokens, flops, session, counter]
    return msgpack.packb(fields if rate == RATE_UNIT else fields + [rate], use_bin_type=True)


def _check_fields(server, client, model, start, end, tokens, flops, session, counter, rate) -> None:
    for name, key in (("server", server), ("client", client)):
        if not isinstance(key, bytes) or len(key) != KEY_LEN:
            raise InvalidReceipt(f"receipt {name} must be a 32-byte public key")
    if server == client:
        raise InvalidReceipt("a receipt's client and server must differ")
    if not isinstance(model, str) or not 0 < len(model) <= MAX_MODEL_LEN:
        raise InvalidReceipt(f"model id must be a string of 1 to {MAX_MODEL_LEN} characters")
    for name, value, lo, hi in (("start", start, 0, MAX_BLOCK), ("end", end, 1, MAX_BLOCK),
                                ("tokens", tokens, 1, MAX_TOKENS), ("flops", flops, 0, MAX_INT),
                                ("counter", counter, 1, MAX_INT), ("rate", rate, 1, MAX_RATE)):
        if type(value) is not int or not lo <= value <= hi:
            raise InvalidReceipt(f"receipt {name} must be an integer in [{lo}, {hi}]")
    if start >= end:
        raise InvalidReceipt("receipt blocks must be a non-empty range [start, end)")
    if not isinstance(session, bytes) or not SESSION_MIN <= len(session) <= SESSION_MAX:
        raise InvalidReceipt(f"session id must be {SESSION_MIN} to {SESSION_MAX} bytes")


# --- in-session helpers (for the pipeline) -----------------------------------------------------------


class ReceiptSigner:
    """Client side, one per (session, server hop): signs cumulative receipts with increasing counters."""

    def __init__(self, identity: Identity, *, server: bytes, model: str, start: int, end: int,
                 pricing: Pricing, session: bytes | None = None, rate: int = RATE_UNIT):
        """`rate`: the session's price rate in thousandths (fixed for the session)."""
        self.identity = identity
        self.server, self.model, self.start, self.end = server, model, start, end
        self.pricing, self.rate = pricing, rate
        self.session = session or new_session_id()
        self.counter = 0
        self.tokens = 0
        self.latest: Receipt | None = None

    def sign(self, tokens_total: int) -> Receipt:
        """A receipt covering `tokens_total` tokens processed by the server in this session so far."""
        if tokens_total < self.tokens:
            raise ValueError("receipts are cumulative: tokens cannot go down")
        self.counter += 1
        self.tokens = tokens_total
        self.latest = Receipt.sign(self.identity, server=self.server, model=self.model, start=self.start,
                                   end=self.end, tokens=tokens_total,
                                   flops=self.pricing(self.model, self.start, self.end, tokens_total, self.rate),
                                   session=self.session, counter=self.counter, rate=self.rate)
        return self.latest


class ReceiptTracker:
    """Server side, one per (session, client): accepts the client's receipts and says what is covered."""

    def __init__(self, *, server: bytes, client: bytes, model: str, start: int, end: int, session: bytes,
                 pricing: Pricing):
        self.server, self.client, self.model = server, client, model
        self.start, self.end, self.session = start, end, session
        self.pricing = pricing
        self.latest: Receipt | None = None

    @property
    def covered_tokens(self) -> int:
        return self.latest.tokens if self.latest else 0

    def accept(self, receipt: Receipt, *, served_tokens: int) -> None:
        """Check and keep `receipt`; raise InvalidReceipt (and keep the previous one) if it is not
        for this session, not newer, claims more than was served, or fails verification."""
        if (receipt.server, receipt.client, receipt.model, receipt.start, receipt.end, receipt.session) != (
                self.server, self.client, self.model, self.start, self.end, self.session):
            raise InvalidReceipt("receipt is for another server, client, model, span or session")
        if self.latest is not None and receipt.rate != self.latest.rate:  # cumulative: a new rate would reprice the past
            raise InvalidReceipt(f"receipt rate {receipt.rate} differs from the session's {self.latest.rate}")
        if self.latest is not None and (receipt.counter <= self.latest.counter or receipt.tokens < self.latest.tokens):
            raise InvalidReceipt(f"receipt counter {receipt.counter} is not newer than {self.latest.counter}")
        if receipt.tokens > served_tokens:
            raise InvalidReceipt(f"receipt covers {receipt.tokens} tokens but only {served_tokens} were served")
        receipt.verify(self.pricing)
        self.latest = receipt

    def require(self, served_tokens: int) -> None:
        """Raise InvalidReceipt unless the receipts held cover `served_tokens` (call before the next step)."""
        if self.covered_tokens < served_tokens:
            raise InvalidReceipt(
                f"client has not signed for {served_tokens - self.covered_tokens} of the {served_tokens} tokens served; "
                "serving stops until it does")
