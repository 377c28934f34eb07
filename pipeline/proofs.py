"""Signed step results and the dispute proofs built from them: what lets a third party check a dispute.

A server signs every step it returns (`SignedStep`): the model, span, dtype, session id and step id,
the step's position and chunks, the *input digest*, the *output digest* and the output *fingerprint*.

- Input digest: a hash chain over the session's effective history. Each step links
  sha256(previous link ‖ msgpack([pos, chunks, tensor_digest(inputs)])) onto the last step that
  started before `pos` (`InputChain`): a step re-run at an earlier position drops what followed it,
  exactly as the KV cache does (`BlockSpan.forward` trims). So replaying the chain's steps in order
  on a fresh cache rebuilds the state the server computed the step from, and a verifier can check that
  the steps a proof carries are the ones the server signed for, without trusting the accuser.
- Output digest: `tensor_digest` of the outputs as sent; the client compares it with what it got.
- Fingerprint: per token, the output projected on `FINGERPRINT_DIMS` random directions drawn from a
  seed the *client* chose at "open" (so a server cannot aim a lie at the projection's null space).
  A hash of the outputs cannot be compared with a re-run (float noise differs across hardware); the
  fingerprint can, within the dtype's tolerance, and it is small (64 bytes a token) where the outputs
  are not.

The client checks every signed step as it arrives (`check_signed`: signature, digests, fingerprint);
a mismatch is a fault (`BadSignedStep`, a FrameError), like a broken stream. A `DisputeProof` is
the accused's signed step plus the steps of its session up to it (position, chunks, input bytes),
inline as a dispute entry's evidence (credits.ledger) when it fits `MAX_PROOF_BYTES`; a larger one
travels as a `DisputeClaim` (the signed step, the proof's sha256 and size) and is fetched from the
accuser (pipeline/proofshelf.py). A verifier (`verify_claim`, cheap: no compute) checks the signature and that the
carried steps hash to the signed input digest; a verifier that holds the span re-runs the steps
(pipeline/disputes.py) and compares the last step's fingerprint (`fingerprint_error`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from credits.entry import verify_signature
from credits.ledger import MAX_EVIDENCE
from p2p.errors import FrameError

from .protocol import MAX_CHUNKS, SESSION_ID_LEN, WIRE_DTYPES

DOMAIN = "potluck/step-result/1"
PROOF_VERSION = "potluck/dispute-proof/1"
SEED_LEN = 16
FINGERPRINT_DIMS = 16
DIGEST_LEN = 32
SIG_LEN = 64
MAX_PROOF_BYTES = MAX_EVIDENCE  # a proof travels inline as a dispute entry's evidence
MAX_PROOF_STEPS = 1024
MAX_FETCHED_PROOF = 15 * 1024 * 1024  # a proof served by its accuser (pipeline/proofshelf.py): under one frame
MAX_FETCHED_STEPS = 1 << 16
CLAIM_VERSION = "potluck/dispute-claim/1"
# a step's fingerprint grows with its tokens (a long prompt's prefill: 64 bytes each); bounded by what a
# fetched proof may hold, not by an inline one (that bound, 12 KiB, refused every step over 192 tokens)
MAX_FINGERPRINT_BYTES = MAX_FETCHED_PROOF
RECORD_FIELDS = 12
CLIENT_FINGERPRINT_TOLERANCE = 1e-4  # the client recomputes the fingerprint of what it received: float noise only


class BadSignedStep(FrameError):
    """A server's signed step is missing, malformed, badly signed, or does not match what it returned."""


class InvalidProof(ValueError):
    """A dispute proof that cannot be decoded (wrong types or sizes)."""


def tensor_digest(t: torch.Tensor) -> bytes:
    """sha256 of hidden states as they travel: dtype, shape and raw bytes (bfloat16 as its 16-bit words)."""
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    head = msgpack.packb([str(t.dtype), list(t.shape)], use_bin_type=True)
    return hashlib.sha256(head + raw.tobytes()).digest()


@functools.lru_cache(maxsize=64)  # one per open session's seed, reused every step
def _projection(seed: bytes, hidden_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed).digest()[:8], "big") >> 1)
    return torch.randn(hidden_size, FINGERPRINT_DIMS, generator=gen, dtype=torch.float32)


def fingerprint(outputs: torch.Tensor, seed: bytes) -> bytes:
    """Outputs [1, n, hidden] → n × FINGERPRINT_DIMS float32 projections (little-endian bytes)."""
    x = outputs.detach().to("cpu").float()[0]
    return (x @ _projection(seed, x.shape[-1])).numpy().astype("<f4").tobytes()


def fingerprint_error(claimed: bytes, recomputed: bytes) -> float:
    """max over tokens of ‖claimed − recomputed‖₂ / ‖recomputed‖₂ (inf if they differ in length)."""
    if len(claimed) != len(recomputed) or len(claimed) % (4 * FINGERPRINT_DIMS):
        return float("inf")
    a = np.frombuffer(claimed, dtype="<f4").reshape(-1, FINGERPRINT_DIMS).astype(np.float64)
    b = np.frombuffer(recomputed, dtype="<f4").reshape(-1, FINGERPRINT_DIMS).astype(np.float64)
    if not np.isfinite(a).all():
        return float("inf")
    num = np.linalg.norm(a - b, axis=1)
    den = np.maximum(np.linalg.norm(b, axis=1), 1e-6)
    return float((num / den).max()) if len(num) else 0.0


def genesis(session: bytes) -> bytes:
    return hashlib.sha256(DOMAIN.encode() + session).digest()


def link(previous: bytes, pos: int, chunks: list[int] | tuple[int, ...], inputs_digest: bytes) -> bytes:
    return hashlib.sha256(previous + msgpack.packb([pos, list(chunks), inputs_digest], use_bin_type=True)).digest()


class InputChain:
    """The input digest of a session's effective history (see the module docstring): the server's copy."""

    def __init__(self, session: bytes):
        self.root = genesis(session)
        self.links: list[tuple[int, bytes]] = []  # (position the step started at, the chain up to it)

    def add(self, pos: int, chunks: list[int], inputs_digest: bytes) -> bytes:
        """The input digest of a step at `pos` whose inputs have `tensor_digest` `inputs_digest` (what
        followed it is dropped, as from the KV cache)."""
        while self.links and self.links[-1][0] >= pos:
            self.links.pop()
        digest = link(self.links[-1][1] if self.links else self.root, pos, chunks, inputs_digest)
        self.links.append((pos, digest))
        return digest


@dataclass(frozen=True)
class SignedStep:
    """One step's result as the server signed it."""

    server: bytes  # the signer's Ed25519 public key
    model: str
    start: int
    end: int
    dtype: str
    session: bytes
    step: int
    pos: int
    chunks: tuple[int, ...]
    input_digest: bytes
    output_digest: bytes
    seed: bytes
    fingerprint: bytes
    signature: bytes = b""

    @property
    def tokens(self) -> int:
        return sum(self.chunks)

    def message(self) -> bytes:
        return msgpack.packb([DOMAIN, self.server, *self.fields()], use_bin_type=True)

    def fields(self) -> list:
        return [self.model, self.start, self.end, self.dtype, self.session, self.step, self.pos, list(self.chunks),
                self.input_digest, self.output_digest, self.seed, self.fingerprint]

    def valid(self) -> bool:
        """The signature is the server's (cheap: one Ed25519 check, no compute)."""
        return verify_signature(self.server, self.message(), self.signature)

    def to_wire(self) -> list:
        return [*self.fields(), self.signature]

    @classmethod
    def from_wire(cls, server: bytes, obj: Any) -> "SignedStep":
        """Decode a signed step from untrusted data (types and sizes checked; the signature is not)."""
        if not isinstance(obj, list) or len(obj) != RECORD_FIELDS + 1:
            raise InvalidProof(f"a signed step is a list of {RECORD_FIELDS + 1} fields")
        model, start, end, dtype, session, step, pos, chunks, din, dout, seed, fp, sig = obj
        if not isinstance(model, str) or not 0 < len(model) <= 128:
            raise InvalidProof("model must be a string of 1..128 characters")
        for name, v in (("start", start), ("end", end), ("step", step), ("pos", pos)):
            if type(v) is not int or not 0 <= v < 1 << 62:
                raise InvalidProof(f"{name} must be a non-negative integer")
        if start >= end:
            raise InvalidProof("the span must hold at least one block")
        if dtype not in WIRE_DTYPES:
            raise InvalidProof("dtype must be a wire dtype")
        if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_CHUNKS \
                or not all(type(c) is int and 0 < c < 1 << 31 for c in chunks):
            raise InvalidProof(f"chunks must be 1..{MAX_CHUNKS} positive integers")
        for name, v, n in (("session", session, SESSION_ID_LEN), ("input digest", din, DIGEST_LEN),
                           ("output digest", dout, DIGEST_LEN), ("seed", seed, SEED_LEN), ("signature", sig, SIG_LEN)):
            if not isinstance(v, bytes) or len(v) != n:
                raise InvalidProof(f"{name} must be {n} bytes")
        if not isinstance(fp, bytes) or len(fp) != sum(chunks) * 4 * FINGERPRINT_DIMS \
                or len(fp) > MAX_FINGERPRINT_BYTES:
            raise InvalidProof("the fingerprint must hold FINGERPRINT_DIMS float32 values per token")
        return cls(server, model, start, end, dtype, session, step, pos, tuple(chunks), din, dout, seed, fp, sig)


def result_digests(outputs: torch.Tensor, seed: bytes) -> tuple[bytes, bytes]:
    """(output digest, fingerprint) of a step's outputs: what signing needs of the tensor (a server
    computes them in its compute thread, not on the trio thread)."""
    return tensor_digest(outputs), fingerprint(outputs, seed)


def sign_step(identity: Any, *, model: str, start: int, end: int, dtype: str, session: bytes, step: int, pos: int,
              chunks: list[int], input_digest: bytes, output_digest: bytes, output_fingerprint: bytes,
              seed: bytes) -> SignedStep:
    """The server's side: sign one step's result (`identity`: a p2p Identity; the digests from
    `InputChain.add` and `result_digests`)."""
    unsigned = SignedStep(identity.public_key, model, start, end, dtype, session, step, pos, tuple(chunks),
                          input_digest, output_digest, seed, output_fingerprint)
    return SignedStep(**{**unsigned.__dict__, "signature": identity.sign(unsigned.message())})


def check_signed(obj: Any, *, server: bytes, model: str, start: int, end: int, dtype: str, session: bytes, step: int,
                 seed: bytes, outputs: torch.Tensor) -> SignedStep:
    """The client's side, as an "out" arrives: the signed step must be the server's, for this session
    and step, and match the outputs received. Raises BadSignedStep. (The input digest is checked
    once the step's inputs are known, `ProvenStep`.)"""
    try:
        record = SignedStep.from_wire(server, obj)
    except InvalidProof as e:
        raise BadSignedStep(f"malformed signed step: {e}") from None
    if (record.model, record.start, record.end, record.dtype, record.session, record.step, record.seed) != \
            (model, start, end, dtype, session, step, seed):
        raise BadSignedStep("the signed step is for another session or step")
    if record.tokens != outputs.shape[1]:
        raise BadSignedStep("the signed step covers another number of tokens")
    if not record.valid():
        raise BadSignedStep("the step's signature is not the server's")
    if record.output_digest != tensor_digest(outputs):
        raise BadSignedStep("the signed output digest does not match the outputs returned")
    if fingerprint_error(record.fingerprint, fingerprint(outputs, seed)) > CLIENT_FINGERPRINT_TOLERANCE:
        raise BadSignedStep("the signed fingerprint does not match the outputs returned")
    return record


@dataclass(frozen=True)
class ProvenStep:
    """One step of a hop as the client sent it and the server signed it (the client's copy of the chain)."""

    pos: int
    chunks: tuple[int, ...]
    inputs: torch.Tensor
    outputs: torch.Tensor
    record: SignedStep

    @property
    def tokens(self) -> int:
        return sum(self.chunks)


class ProvenLog:
    """A hop's effective history of signed steps, kept by the client (what a dispute proof is built from)."""

    def __init__(self, session: bytes):
        self.root = genesis(session)
        self.steps: list[ProvenStep] = []

    def accept(self, record: SignedStep, pos: int, chunks: list[int] | tuple[int, ...], inputs: torch.Tensor,
               outputs: torch.Tensor) -> None:
        """Add a step whose inputs are now known; BadSignedStep if the server signed other inputs (or
        another position). Nothing changes unless it is accepted."""
        if record.pos != pos or record.chunks != tuple(chunks):
            raise BadSignedStep("the signed step has another position or chunks than the step sent")
        kept = len(self.steps)
        while kept and self.steps[kept - 1].pos >= pos:
            kept -= 1
        previous = self.steps[kept - 1].record.input_digest if kept else self.root
        if link(previous, pos, chunks, tensor_digest(inputs)) != record.input_digest:
            raise BadSignedStep("the signed input digest is not that of the inputs sent")
        del self.steps[kept:]
        self.steps.append(ProvenStep(pos, tuple(chunks), inputs, outputs, record))

    def proof(self, index: int) -> "DisputeProof":
        """The proof that step `index` was signed with these outputs, for these inputs."""
        steps = self.steps[:index + 1]
        return DisputeProof(steps[-1].record, [(s.pos, s.chunks, s.inputs) for s in steps])


@dataclass(frozen=True)
class DisputeProof:
    """The accused's signed step and the session's steps up to it: enough for a holder of the span to re-run it."""

    record: SignedStep
    steps: list[tuple[int, tuple[int, ...], torch.Tensor]]  # (pos, chunks, inputs [1, tokens, hidden])

    def encode(self) -> bytes:
        from .protocol import pack_hidden

        steps = [[pos, list(chunks), pack_hidden(inputs)["data"]] for pos, chunks, inputs in self.steps]
        return msgpack.packb([PROOF_VERSION, self.record.to_wire(), steps], use_bin_type=True)

    @classmethod
    def decode(cls, data: Any, accused: bytes, hidden_size: int | None = None, *, max_bytes: int = MAX_PROOF_BYTES,
               max_steps: int = MAX_PROOF_STEPS) -> "DisputeProof":
        """Strictly decode untrusted evidence bytes; InvalidProof says what is wrong. `hidden_size`
        (the verifier's model) fixes the inputs' shape; None: inferred from the first step. A proof
        fetched from its accuser may be larger (`MAX_FETCHED_PROOF`, `MAX_FETCHED_STEPS`)."""
        if not isinstance(data, bytes) or len(data) > max_bytes:
            raise InvalidProof(f"a proof is at most {max_bytes} bytes")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=0,
                                  max_array_len=max(max_steps, MAX_CHUNKS), max_str_len=128, max_bin_len=max_bytes)
        except Exception as e:  # noqa: BLE001 - any msgpack defect
            raise InvalidProof(f"a proof is not valid msgpack: {type(e).__name__}") from None
        if not isinstance(obj, list) or len(obj) != 3 or obj[0] != PROOF_VERSION:
            raise InvalidProof(f"a proof is [{PROOF_VERSION!r}, signed step, steps]")
        record = SignedStep.from_wire(accused, obj[1])
        raw_steps = obj[2]
        if not isinstance(raw_steps, list) or not 0 < len(raw_steps) <= max_steps:
            raise InvalidProof(f"a proof carries 1..{max_steps} steps")
        itemsize = 2 if record.dtype == "bfloat16" else 4
        steps = []
        for s in raw_steps:
            if not isinstance(s, list) or len(s) != 3:
                raise InvalidProof("a proof step is [pos, chunks, input bytes]")
            pos, chunks, raw = s
            if type(pos) is not int or not 0 <= pos < 1 << 62:
                raise InvalidProof("a step's position must be a non-negative integer")
            if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_CHUNKS \
                    or not all(type(c) is int and 0 < c < 1 << 31 for c in chunks):
                raise InvalidProof(f"a step's chunks must be 1..{MAX_CHUNKS} positive integers")
            tokens = sum(chunks)
            if not isinstance(raw, bytes) or len(raw) % (tokens * itemsize):
                raise InvalidProof("a step's inputs must be tokens × hidden values of the dtype")
            hidden = hidden_size if hidden_size is not None else len(raw) // (tokens * itemsize)
            if hidden <= 0 or len(raw) != tokens * hidden * itemsize:
                raise InvalidProof("a step's inputs do not have the model's hidden size")
            arr = np.frombuffer(raw, dtype="<u2" if itemsize == 2 else "<f4").reshape(1, tokens, hidden).copy()
            t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16) if itemsize == 2 else torch.from_numpy(arr)
            steps.append((pos, tuple(chunks), t))
        if steps[-1][0] != record.pos or steps[-1][1] != record.chunks:
            raise InvalidProof("the last step of a proof is the signed one")
        return cls(record, steps)

    def inputs_match(self) -> bool:
        """The carried steps hash (as an `InputChain`) to the signed input digest: they are what the
        server ran the signed step on. Cheap: hashing only."""
        chain = InputChain(self.record.session)
        digest = b""
        for pos, chunks, inputs in self.steps:
            digest = chain.add(pos, list(chunks), tensor_digest(inputs))
        return digest == self.record.input_digest and len(chain.links) == len(self.steps)


@dataclass(frozen=True)
class DisputeClaim:
    """What a dispute entry carries when its proof is too large for it: the accused's signed step and
    the sha256 and size of the full proof, which the accuser serves (pipeline/proofshelf.py)."""

    record: SignedStep
    digest: bytes
    size: int

    def encode(self) -> bytes:
        return msgpack.packb([CLAIM_VERSION, self.record.to_wire(), self.digest, self.size], use_bin_type=True)

    @classmethod
    def decode(cls, data: Any, accused: bytes) -> "DisputeClaim":
        """Strictly decode untrusted evidence bytes; InvalidProof says what is wrong."""
        if not isinstance(data, bytes) or len(data) > MAX_PROOF_BYTES:
            raise InvalidProof(f"a claim is at most {MAX_PROOF_BYTES} bytes")
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_map_len=0,
                                  max_array_len=MAX_CHUNKS, max_str_len=128, max_bin_len=MAX_PROOF_BYTES)
        except Exception as e:  # noqa: BLE001 - any msgpack defect
            raise InvalidProof(f"a claim is not valid msgpack: {type(e).__name__}") from None
        if not isinstance(obj, list) or len(obj) != 4 or obj[0] != CLAIM_VERSION:
            raise InvalidProof(f"a claim is [{CLAIM_VERSION!r}, signed step, proof sha256, proof size]")
        record = SignedStep.from_wire(accused, obj[1])
        digest, size = obj[2], obj[3]
        if not isinstance(digest, bytes) or len(digest) != DIGEST_LEN:
            raise InvalidProof(f"a claim names its proof by a {DIGEST_LEN}-byte sha256")
        if type(size) is not int or not 0 < size <= MAX_FETCHED_PROOF:
            raise InvalidProof(f"a claimed proof is 1..{MAX_FETCHED_PROOF} bytes")
        return cls(record, digest, size)


def is_claim(evidence: Any) -> bool:
    """Whether dispute evidence is a `DisputeClaim` (else it should be an inline `DisputeProof`)."""
    prefix = msgpack.packb(CLAIM_VERSION)
    return isinstance(evidence, bytes) and evidence[1:1 + len(prefix)] == prefix
