"""Judging disputes: a peer that holds a span re-runs the proofs of disputes against servers of it.

A dispute entry (credits.ledger) carries a `DisputeProof` (pipeline/proofs.py). `DisputeJudge` takes
the disputes its ledger holds that it has no verdict on yet (`Ledger.unjudged_disputes`: never those
of an accuser already caught making a false accusation) and judges each, cheapest check first:

1. the proof (or claim, pipeline/proofshelf.py) decodes (bounded: sizes and types) — else the
   accusation is false;
2. the signed step is the accused's (one Ed25519 check) — else false: a forged record costs no
   compute and no transfer;
3. the carried steps hash to the signed input digest (hashing only) — else false: the accuser
   claimed inputs the server never ran (a claim's proof is fetched from the accuser first, only by
   a peer that holds the span; one the accuser does not serve leaves no verdict);
4. only then, if this peer holds the span (`SpanReplayer`, a serving peer's `ServedBlocks`), it
   replays the steps on a fresh KV cache and compares the signed step's fingerprint with its own
   within the dtype's tolerance: beyond it, the accused lied; within it, the accusation was false.
   A peer that does not hold the span keeps "cannot judge" and the dispute counts nothing here.

Verdicts go to the peer's own store (`Ledger.record_verdict`); a liar or false accuser then has
reliability 0 in this peer's view (routing, standing). So a peer filing 1,000 false disputes costs
the verifier at most one replay (none with forged records), and the accused nothing. An accused
already proven a liar here needs no replay: its dispute is taken once steps 1–3 pass.
Replays run in the server's compute limiter at the lowest priority: paying clients go first.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Protocol

import torch
import trio

from credits import Ledger
from p2p.network import Network

from .limiter import PriorityLimiter
from .model import BlockSpan, CacheError
from .proofs import (
    MAX_FETCHED_PROOF, MAX_FETCHED_STEPS, DisputeClaim, DisputeProof, InvalidProof, fingerprint, fingerprint_error,
    is_claim,
)
from .proofshelf import fetch_proof
from .protocol import WIRE_DTYPES
from .spotcheck import SpotCheckConfig

log = logging.getLogger(__name__)

ProofSteps = list[tuple[int, tuple[int, ...], torch.Tensor]]


class SpanReplayer(Protocol):
    """Blocks this peer can re-run a proof on (a serving peer's `ServedBlocks`)."""

    @property
    def hidden_size(self) -> int | None: ...

    def holds(self, model: str, start: int, end: int, dtype: str) -> bool:
        """This peer computes blocks [start, end) of `model` in `dtype`."""

    async def replay(self, start: int, end: int, steps: ProofSteps) -> torch.Tensor:
        """Run `steps` in order on a fresh KV cache of blocks [start, end); the last step's outputs."""


class BlocksServer(Protocol):
    """What `ServedBlocks` reads of a BlockServer (pipeline/server.py)."""

    span: BlockSpan | None
    model_id: str | None
    dtype_name: str
    limiter: PriorityLimiter


class ServedBlocks:
    """The blocks a `BlockServer` serves, as a `SpanReplayer`."""

    def __init__(self, server: BlocksServer):
        self.server = server

    @property
    def hidden_size(self) -> int | None:
        span = self.server.span
        return span.cfg.hidden_size if span is not None else None

    def holds(self, model: str, start: int, end: int, dtype: str) -> bool:
        span = self.server.span
        return (span is not None and self.server.model_id == model and self.server.dtype_name == dtype
                and span.start <= start < end <= span.end)

    async def replay(self, start: int, end: int, steps: ProofSteps) -> torch.Tensor:
        span = self.server.span
        assert span is not None  # holds() said so
        sub = BlockSpan(span.cfg, start, end, span.blocks[start - span.start:end - span.start], dtype=span.dtype,
                        device=span.device)

        def run() -> torch.Tensor:
            cache = sub.new_cache(max(pos + sum(chunks) for pos, chunks, _ in steps))
            outs: list[torch.Tensor] = []  # the last step's
            for pos, chunks, inputs in steps:
                outs, off = [], 0
                for c in chunks:
                    outs.append(sub.forward(inputs[:, off:off + c], cache, pos + off))
                    off += c
            return torch.cat(outs, dim=1).to("cpu")

        lowest: Any = self.server.limiter.at(-math.inf)  # a CapacityLimiter to trio, as in the server
        return await trio.to_thread.run_sync(run, limiter=lowest)


def default_tolerance(dtype: str) -> float:
    """What a fingerprint may differ by on other hardware: the spot checks' tolerance for the dtype."""
    return SpotCheckConfig().tol(WIRE_DTYPES[dtype])


class DisputeJudge:
    """Judges the disputes in `ledger` (see the module docstring); `blocks` None: this peer holds no span."""

    def __init__(self, ledger: Ledger, blocks: SpanReplayer | None, *, network: Network | None = None,
                 period: float = 5.0, batch: int = 64, tolerance: Callable[[str], float] = default_tolerance):
        """`network`: where proofs too large for an entry are fetched from their accusers (None: never)."""
        self.ledger = ledger
        self.blocks = blocks
        self.network = network
        self.period = period
        self.batch = batch
        self.tolerance = tolerance
        self.stats = {"lies": 0, "false": 0, "malformed": 0, "forged": 0, "bad_inputs": 0, "unjudged": 0,
                      "unfetched": 0, "replays": 0}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Judge new disputes whenever the ledger changed, every `period` seconds, until cancelled."""
        task_status.started()
        seen = -1
        while True:
            if self.ledger.version != seen:
                seen = self.ledger.version
                while await self.judge_pending():
                    pass
                seen = self.ledger.version  # our own verdicts bumped it
            await trio.sleep(self.period)

    async def judge_pending(self) -> int:
        """Judge up to `batch` disputes not judged yet; how many were judged."""
        pending = await self.ledger.unjudged_disputes(self.batch)
        judged = 0
        for entry, accused, evidence in pending:
            liars, false_accusers = await self.ledger.read(self.ledger.verdicts_sync)
            if entry.author in false_accusers:  # caught earlier in this batch: never verified again
                continue
            verdict = await self.judge(accused, evidence, accuser=entry.author_id, proven=accused in liars)
            await self.ledger.record_verdict(entry.author, entry.seq, accused, verdict)
            judged += 1
            if verdict is not None:
                log.info("dispute %d of %s against %s: %s", entry.seq, entry.author_id[-8:], accused.hex()[:8],
                         "a proven lie" if verdict else "a false accusation")
        return judged

    async def judge(self, accused: bytes, evidence: bytes, *, accuser: str | None = None,
                    proven: bool = False) -> bool | None:
        """True: `accused` lied; False: the accusation is false; None: this peer cannot tell (it does not
        hold the span, or `accuser` does not serve the proof its claim names)."""
        hidden = self.blocks.hidden_size if self.blocks is not None else None
        claim: DisputeClaim | None = None
        proof: DisputeProof | None = None
        try:
            if is_claim(evidence):
                claim = DisputeClaim.decode(evidence, accused)
                record = claim.record
            else:
                proof = DisputeProof.decode(evidence, accused, hidden)
                record = proof.record
        except InvalidProof:
            return self._false("malformed")
        if not record.valid():
            return self._false("forged")
        if proof is not None and not proof.inputs_match():
            return self._false("bad_inputs")
        if proven:
            return True
        if self.blocks is None or not self.blocks.holds(record.model, record.start, record.end, record.dtype):
            self.stats["unjudged"] += 1
            return None
        if claim is not None:
            data = None
            if self.network is not None and accuser is not None:
                data = await fetch_proof(self.network, accuser, claim.digest, claim.size)
            if data is None:
                self.stats["unfetched"] += 1
                return None
            try:
                proof = DisputeProof.decode(data, accused, hidden, max_bytes=MAX_FETCHED_PROOF,
                                            max_steps=MAX_FETCHED_STEPS)
            except InvalidProof:
                return self._false("malformed")
            if proof.record != record or not proof.inputs_match():
                return self._false("bad_inputs")
        assert proof is not None  # inline, or fetched just above
        try:
            out = await self.blocks.replay(record.start, record.end, proof.steps)
        except CacheError as e:  # positions the server itself would have refused: it never signed them
            log.info("proof does not replay: %s", e)
            self.stats["unjudged"] += 1
            return None
        self.stats["replays"] += 1
        lie = fingerprint_error(record.fingerprint, fingerprint(out, record.seed)) > self.tolerance(record.dtype)
        self.stats["lies" if lie else "false"] += 1
        return lie

    def _false(self, why: str) -> bool:
        self.stats[why] += 1
        self.stats["false"] += 1
        return False
