"""The inference stream protocol `/potluck/inference/1.0.0`: messages, their checks, tensors on the wire.

One stream is one inference session with one server for one (sub-)span of blocks. Every message
is a msgpack map with a type "t"; the server answers each client message with exactly one message,
in order.

client → server
    {"t": "open", "model": model id (hex), "start": a, "end": b, "max_length": L, "dtype": "float32"|"bfloat16",
     "seed": 16 bytes (optional: the client's fingerprint seed; with it, every "out" is signed)}
        → {"t": "opened", "session": 16 random bytes, "start": a, "end": b, "max_length": L,
           "cache_tokens_left": int, "rate": int (when it bills: the session's receipts carry this rate)}
    {"t": "step", "id": n, "pos": p, "h": tensor [1, k, hidden], "chunks": [k1, k2, ...] (optional),
     "push": [{"peer": id, "session": bytes, "receipt": ...}, ...] (optional), "receipt": (credits)}
        → {"t": "out", "id": n, "h": tensor [1, k, hidden], "compute_s": seconds, "pushed": bool,
           "served": tokens computed in this session so far, "signed": the server's signed result
           (pipeline/proofs.py SignedStep: span, session, step, pos, chunks, input digest, output
           digest, fingerprint; sent when "open" carried a seed)}
      `chunks` replays several earlier steps in one message: the server runs them one after the other
      (k = Σ chunks), exactly as they first ran, so a rebuilt KV cache is bit-identical to the lost one.
      `push` (server-to-server forwarding): after computing, the server also sends its output to the
      first entry's session as a "push" on a stream of its own, with the rest of the list. The first
      entry must be a server whose current announcement covers the block after this session's span
      (else PushRefused, before computing); it is dialled by peer id (its announced addresses), never
      at an address from the client.
      `receipt` (credits, pipeline/billing.py) covers every token served so far AND this step's: the
      step is paid for before it is computed (ReceiptRequired / CreditRefused otherwise).
      `pos` below the tokens the session holds rolls the KV cache back to `pos` first. Rolling back
      into the previous step only — the rejected drafts of a speculative pass (pipeline/speculative.py)
      — takes its rolled-back tokens off "served", at most MAX_REFUNDED_TOKENS and never that step's
      first (`refunded_tokens`: client and server count the same); a deeper rollback is a re-run, billed.
    {"t": "close"}                                 → {"t": "closed"} and the stream ends

server → server (stream `/potluck/inference-push/1.0.0`, one per pair of servers, no replies)
    {"t": "push", "session": bytes, "id": n, "pos": p, "h": tensor, "push": [...]}
      The receiving server runs the step in that session and answers on the session's own client
      stream with an "out" message, exactly as if the client had sent the step.

Errors: {"t": "error", "kind": name, "m": readable message, "limit": tokens (optional)}. The stream
stays usable after an error in one message (the client decides); the server never dies of a message.
Kinds that are *refusals* (pipeline/errors.py maps them to typed exceptions; never a reason to ban):
    BadMaxLength, MaxLengthExceeded   the session is too long ("limit": the most tokens it takes)
    CacheFull                         no room in the KV cache now, or past the client's share of it
                                      ("limit": tokens it could hold)
    CreditRefused                     the client owes (or this step would make it owe) the server more than
                                      its allowance: the debt limit plus its standing there
    ReceiptRequired, BadReceipt       no valid receipt for what was served (credits); ReceiptRequired's
                                      "limit": the tokens the receipts must cover, this step included
    ModelMismatch, DtypeMismatch, SpanNotServed   another model, dtype or span
    TooManySessions, ServerStopping   busy or shutting down
    PushRefused                       the push list's next hop is not an announced server of the next blocks
The server ended the session (sent as the stream closes; the client re-routes and replays, no ban):
    Displaced                         its idle cache was given to another client (pipeline/server.py)
    SessionExpired                    idle too long, moved or stopping
The others (BadRequest, BadPosition, StaleStep, NoSession, SessionOpen, CacheError, BadPeer) say that a
message or a session broke.
"""

from __future__ import annotations

from typing import Any, Literal, overload

import numpy as np
import torch

from p2p import tensor as wire_tensor
from p2p.errors import FrameError, P2PError
from p2p.framing import expect_map, field
from p2p.network import protocol_id

INFERENCE = protocol_id("inference", "1.0.0")
PUSH = protocol_id("inference-push", "1.0.0")
ANNOUNCE_NAMESPACE = "pipeline"
WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_LENGTH_LIMIT = 1 << 20
MAX_CHUNKS = 4096
MAX_PUSH = 64
SESSION_ID_LEN = 16
SESSION_EXPIRED = "SessionExpired"  # the error kinds of a session the server ended (see above)
DISPLACED = "Displaced"
MAX_REFUNDED_TOKENS = 16  # rolled-back tokens a step may take off "served" (pipeline/speculative.py MAX_DRAFT)


class InferenceError(P2PError):
    """A server refused or failed a session message; `kind` says which check failed, `limit` (for
    the too-long and cache-full kinds) how many tokens it would take."""

    def __init__(self, kind: str, message: str, limit: int | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.limit = limit


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in WIRE_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot travel as hidden states; use float32 or bfloat16")


def pack_hidden(hidden: torch.Tensor) -> dict:
    """Hidden states → wire tensor (float32 as is; bfloat16 as its raw 16-bit words)."""
    t = hidden.detach().to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        return wire_tensor.pack(t.view(torch.int16).numpy().view(np.uint16), dtype="bfloat16")
    if t.dtype != torch.float32:
        raise ValueError(f"hidden states must be float32 or bfloat16, not {t.dtype}")
    return wire_tensor.pack(t.numpy())


def unpack_hidden(msg: Any, *, dtype: str, hidden_size: int, max_tokens: int | None = None) -> torch.Tensor:
    """Validate a wire tensor as hidden states [1, n, hidden_size] of `dtype`; FrameError says what is wrong."""
    wt = wire_tensor.unpack(msg)
    if wt.dtype != dtype:
        raise FrameError(f"hidden states have dtype {wt.dtype}, the session uses {dtype}")
    if len(wt.shape) != 3 or wt.shape[0] != 1 or wt.shape[2] != hidden_size:
        raise FrameError(f"hidden states must have shape [1, tokens, {hidden_size}], got {list(wt.shape)}")
    if wt.shape[1] == 0:
        raise FrameError("a step must carry at least one token")
    if max_tokens is not None and wt.shape[1] > max_tokens:
        raise FrameError(f"step of {wt.shape[1]} tokens is longer than the session allows ({max_tokens})")
    arr = np.array(wt.numpy())  # a writable copy we own
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def error(kind: str, message: str, limit: int | None = None) -> dict:
    msg: dict = {"t": "error", "kind": kind, "m": message[:1000]}
    if limit is not None:
        msg["limit"] = limit
    return msg


def expect_reply(msg: Any, kind: str) -> dict:
    """A server reply of type `kind`, or raise InferenceError (its error, or a malformed reply)."""
    m = expect_map(msg, "inference reply")
    t = field(m, "t", str, max_len=16)
    if t == "error":
        raise InferenceError(field(m, "kind", str, max_len=100), field(m, "m", str, max_len=1000),
                             int_field(m, "limit", 0, 1 << 40, optional=True))
    if t != kind:
        raise FrameError(f"expected a {kind!r} reply, got {t!r}")
    return m


@overload
def int_field(m: dict, name: str, lo: int, hi: int, *, optional: Literal[False] = False) -> int: ...
@overload
def int_field(m: dict, name: str, lo: int, hi: int, *, optional: bool) -> int | None: ...
def int_field(m: dict, name: str, lo: int, hi: int, *, optional: bool = False) -> int | None:
    v = field(m, name, int, optional=optional)
    if v is None:
        return None
    if not lo <= v <= hi:
        raise FrameError(f"field {name!r} = {v} is outside [{lo}, {hi}]")
    return v


def parse_push(value: Any) -> list[tuple[str, bytes]]:
    """The "push" list: [(peer id, session id)], checked."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_PUSH:
        raise FrameError(f"'push' must be a list of at most {MAX_PUSH} hops")
    out = []
    for hop in value:
        h = expect_map(hop, "push hop")
        out.append((field(h, "peer", str, max_len=128), field(h, "session", bytes, max_len=SESSION_ID_LEN)))
    return out


def refunded_tokens(last_pos: int, last_tokens: int, pos: int) -> int:
    """Tokens a step at `pos` takes off "served" after a step of `last_tokens` at `last_pos`: those it
    rolls back, when it rolls back into that step but not past its first token, at most MAX_REFUNDED_TOKENS
    (so every step still pays at least one token, and a server computes at most that many unpaid)."""
    held = last_pos + last_tokens
    if not last_pos < pos < held:
        return 0
    return min(held - pos, MAX_REFUNDED_TOKENS)


def parse_chunks(value: Any, total: int) -> list[int]:
    if value is None:
        return [total]
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHUNKS:
        raise FrameError(f"'chunks' must be a list of 1..{MAX_CHUNKS} positive integers")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value):
        raise FrameError("'chunks' must hold positive integers")
    if sum(value) != total:
        raise FrameError(f"'chunks' add up to {sum(value)}, the step carries {total} tokens")
    return list(value)
