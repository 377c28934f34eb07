"""Spot checks: the client re-runs steps on a second server (which ones: pipeline/checkpolicy.py) and compares outputs.

Choice — *lazy shadow sessions*. A decode step cannot be re-run alone: its output depends on the
KV cache of every earlier step. The options were (a) shadow every step of a sampled session on a
second server (100 % extra decode work for that session, paid whether or not anyone lies), (b) check
only prefill steps (stateless, cheap, but a liar that is honest on prefills and lies on decode steps
is never caught), or (c) what we do: the client keeps, per hop, what it sent and got back
(inputs, chunks, outputs of every step; the session keeps the inputs anyway for fault recovery).
After each step of hop H the check policy (pipeline/checkpolicy.py) says whether to check now: by
default `AdaptivePolicy` — every step of a server new to this client (or recently wrong) until it
has enough verified steps, then a probability falling with its record; `SpotCheckConfig(fraction=p)`
is the old fixed probability per step (tests, the benchmark's baseline). When a step of hop H is selected,
the client opens — on first need — a checker session on another server C whose span holds H's
blocks, and sends C, in ONE message with the original `chunks`, every step of H that C has not yet
seen. C rebuilds the same KV state chunk by chunk (exactly as H built it, so honest outputs agree to
float noise) and its outputs are compared with everything H returned since the last check. So:

- one check verifies ALL of H's earlier steps, not just the selected one: a liar that lies on any
  step is caught at the first check after its first lie;
- C's work is batched like a prefill (far cheaper per token than decode), incremental (the checker
  session stays open, later checks send only the new steps), and bounded by one pass over the
  session: a session with no selected step costs nothing, one with checks costs at most a prefill
  of its length on C;
- the check runs before H's output is passed on, so a lie caught on the selected step never
  reaches the output: H is replaced (history replayed elsewhere) and the step re-run; what an
  unchecked lie already changed cannot be undone (with fraction 1.0 and checkers that answer in time, nothing is ever used unchecked).

On a mismatch a referee R (a third server for the span) replays H's whole history in a fresh session;
the server R disagrees with is the liar (if R agrees with neither, or no third server exists, the
check is inconclusive: both are banned for a while, nobody is accused). The liar is distrusted by the
route (never used again by this client), and, with billing, gets a verdict in the client's own view
and a signed *dispute* entry on the client's chain whose evidence is a proof (pipeline/proofs.py):
the liar's own signed result for its first step that differs from the honest outputs, and the
inputs of its session up to that step, which any peer holding the span can re-run
(pipeline/disputes.py); a proof too large for an entry is filed as a claim and served from the
client's shelf (pipeline/proofshelf.py). Checker and referee sessions are ordinary sessions: the
client pays them with receipts like any hop. A passed check is also handed to
`SpotCheckConfig.attestations`, which shares it with other clients as a signed attestation
(pipeline/attestations.py; how they count it: pipeline/checkpolicy.py).

Checker choice and bounded checks. A check runs while the user waits, so the checker is the nearest
candidate: candidates are ordered by the client's RTT estimate (routing's: measured by sessions, the
DHT's pings, else Vivaldi), in buckets of `NEAR_S` — within a bucket, and for a candidate with no
estimate yet (its first check measures it), the order is random, spreading checks over equally near
replicas. A checker or referee whose session opened is one the client has reached: routes believe its
announcement from then on (pipeline/routing.py). And a check is bounded: opening the checker session and its replay get `wait_min` +
`wait_factor` × the wall time of the steps it covers (as the client measured them), never more than
the step timeout. A checker that has not answered by then is dropped (its session closed; not banned:
slow is not a fault) and the output is used *unchecked for now*: the steps stay in the hop's
unverified history, so the next check — on the same checker, or after `max_timeouts` consecutive
misses in this session on another one — covers them, and a lie among them is caught there. A slow
checker costs the user at most the bound per check, not its own time (counted as `timeouts`;
`waited_s` sums the waits). A mismatch is not bounded: the referee is asked before the output is used.

Tolerance. Comparison: per token, ‖a − b‖₂ / ‖b‖₂ ≤ the tolerance of the coarser dtype of the two
servers (`TOLERANCE`; today both compute in the session's dtype: a server refuses another). Honest
servers differ by rounding: bench/spotcheck.py measured, on the tiny test model (4 blocks) and
SmolLM2 (30 blocks), torch thread counts 1 vs 4 giving bit-identical bf16/fp16 results and ≤ 1e-6
in fp32; the dtypes themselves, against an fp32 reference, ≤ 0.08 (bf16, the tiny model's worst
token; SmolLM2 0.06) and ≤ 0.009 (fp16). Two honest servers of one dtype on different hardware
are each that close to the reference, so up to twice that apart; the tolerances are that with a
margin: bf16 0.25, fp16 0.05, fp32 1e-3 (which also leaves room for TF32-like GPU matmuls, not
measured here). Zero false accusations over 10,000 checked steps per pair. The price: a bf16 pair
cannot tell a lie smaller than ~30 % relative error from noise (fp16: ~10 %, fp32: 0.2 %; the tests'
liars lie by ~4 %, so they run in fp32).

The client's own blocks (pipeline/hop.py `LocalHop`) are never checked — nobody checks us against
ourselves — but its own server is a checker and referee candidate like any other, run in process.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import trio

from p2p.errors import P2PError

from .billing import ClientBilling
from .checkpolicy import AdaptivePolicy, CheckPolicy, FixedPolicy
from .errors import Refused
from .hop import Hop, RemoteHop, StepRecord
from .proofs import DisputeProof
from .routing import RouteHop, SequenceManager

log = logging.getLogger(__name__)

MAX_CHECK_CHUNKS = 1024  # chunks per check message (the protocol allows 4096)
NEAR_S = 0.04  # checker candidates whose RTT estimates fall in one bucket this wide are equally near


class CheckedSession(Protocol):
    """What the checker needs of the session it checks (pipeline.client.InferenceSession has it)."""

    async def open_hop(self, route_hop: RouteHop, addrs: Sequence[str]) -> Hop:
        """A new session with a server (which announced `addrs`), opened like the route's own (same model,
        length, dtype)."""

    async def run_hop(self, hop: Hop, inputs: torch.Tensor, pos: int, chunks: list[int]) -> torch.Tensor:
        """One step (or a replay of several, `chunks`) through `hop`; its outputs."""

    async def close_hop(self, hop: Hop, polite: bool = True, pay: bool = True) -> None:
        """Close `hop`, paying for what it served."""


class AttestationSink(Protocol):
    """Where a passed check's verified steps go to be shared (pipeline/attestations.py `AttestationBook`)."""

    def verified(self, server: str, model: str, start: int, end: int, steps: int) -> None: ...

    def failed(self, server: str) -> None:
        """A check caught `server` (or could not tell it from its checker): share nothing of it."""


# Max per-token relative L2 error between two honest servers computing in a dtype (see "Tolerance" in
# the module docstring; measured by bench/spotcheck.py).
TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 0.25}


@dataclass
class SpotCheckConfig:
    fraction: float | None = None  # fixed probability per step (tests, the benchmark's baseline); None: `policy`
    policy: AdaptivePolicy = field(default_factory=AdaptivePolicy)  # per-server trust, shared by the model's sessions
    tolerance: float | None = None  # max per-token relative L2 error; None: by dtype (TOLERANCE)
    referee: bool = True  # on a mismatch, ask a third server
    seed: int | None = None
    # A check waits at most wait_min + wait_factor × (the checked steps' own time), and never past the
    # step timeout; then the output is used unchecked for now (see "Bounded checks" above).
    wait_min: float = 1.0
    wait_factor: float = 3.0
    max_timeouts: int = 2  # consecutive checks a checker may leave unanswered before another is chosen
    attestations: AttestationSink | None = None  # passed checks are shared as signed attestations

    @property
    def enabled(self) -> bool:
        return self.fraction is None or self.fraction > 0

    def selection(self) -> CheckPolicy:
        return self.policy if self.fraction is None else FixedPolicy(self.fraction)

    def tol(self, *dtypes: torch.dtype) -> float:
        """The tolerance for comparing servers computing in `dtypes`: the coarsest one's."""
        if self.tolerance is not None:
            return self.tolerance
        return max(TOLERANCE.get(d, max(TOLERANCE.values())) for d in dtypes)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over tokens of ‖a − b‖₂ / ‖b‖₂ (a, b: [1, n, hidden])."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    num = (a - b).norm(dim=-1)
    den = b.norm(dim=-1).clamp_min(1e-6)
    return float((num / den).max()) if num.numel() else 0.0


def _proof(liar: Hop, reference: torch.Tensor, start_pos: int, tol: float) -> DisputeProof | None:
    """The proof against `liar`: its first signed step, among those `reference` (honest outputs from
    position `start_pos` on) covers, whose outputs differ beyond `tol`; None if none does."""
    if not isinstance(liar, RemoteHop):
        return None
    end_pos = start_pos + reference.shape[1]
    steps = liar.log.steps
    for i, step in enumerate(steps):
        # what the session kept of it: a later step may have rolled its rejected drafts back
        kept = steps[i + 1].pos - step.pos if i + 1 < len(steps) else step.tokens
        if step.pos < start_pos or step.pos + kept > end_pos:
            continue
        honest = reference[:, step.pos - start_pos:step.pos - start_pos + kept]
        if relative_error(step.outputs[:, :kept], honest) > tol:
            return liar.log.proof(i)
    return None


@dataclass
class _Watch:
    """The checker's view of one route hop: its steps, how far they are verified, its checker session."""

    records: list[StepRecord] = field(default_factory=list)
    took: list[float] = field(default_factory=list)  # wall seconds of each record's step, as the client saw it
    verified: int = 0  # positions before this one were confirmed by the checker
    checker: Hop | None = None
    refused: set[str] = field(default_factory=set)  # candidates that refused to check it: not asked again


class SpotChecker:
    """One session's spot checks (see the module docstring)."""

    def __init__(self, session: CheckedSession, config: SpotCheckConfig, *, routes: SequenceManager,
                 dtype: torch.dtype, model_id: str, billing: ClientBilling | None, step_timeout: float = 30.0):
        self.session = session
        self.step_timeout = step_timeout
        self.config = config
        self.seq = routes
        self.dtype = dtype
        self.model_id = model_id
        self.billing = billing
        self.rng = random.Random(config.seed) if config.seed is not None else random.Random()
        self.policy = config.selection()
        self._watches: dict[Hop, _Watch] = {}
        self._timeouts: dict[str, int] = {}  # checker → consecutive checks it left unanswered, this session
        self.stats = {"checks": 0, "passed": 0, "mismatches": 0, "liars": 0, "inconclusive": 0, "unchecked": 0,
                      "checked_tokens": 0, "timeouts": 0, "waited_s": 0.0}

    def selected(self, hop: Hop) -> bool:
        """Whether to check `hop`'s unverified steps now (after each of its steps), as the policy says."""
        p = self.policy.probability(hop.peer_id)
        return p >= 1.0 or (p > 0 and self.rng.random() < p)

    def record(self, hop: Hop, step: StepRecord, seconds: float | None = None) -> None:
        """Log a completed step of route hop `hop` that took `seconds` (None: unknown, as long as its previous
        one); a re-run at an earlier position replaces what followed it."""
        watch = self._watches.setdefault(hop, _Watch())
        while watch.records and watch.records[-1].pos >= step.pos:
            watch.records.pop()
            watch.took.pop()
        if watch.records:  # a step rolling back the rejected drafts of the one before it
            watch.records[-1] = watch.records[-1].upto(step.pos)
        watch.verified = min(watch.verified, step.pos)
        watch.records.append(step)
        watch.took.append(seconds if seconds is not None else (watch.took[-1] if watch.took else 0.0))

    def bound(self, watch: _Watch, first: int) -> float:
        """Seconds a check of `watch`'s records from index `first` on may take (see "bounded checks")."""
        cfg = self.config
        return min(self.step_timeout, cfg.wait_min + cfg.wait_factor * sum(watch.took[first:]))

    async def forget(self, hop: Hop) -> None:
        """`hop` left the route: close its checker session and drop what was kept for it."""
        watch = self._watches.pop(hop, None)
        if watch is not None and watch.checker is not None:
            await self.session.close_hop(watch.checker)

    async def aclose(self) -> None:
        """Close every checker session (the session is ending)."""
        watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            if watch.checker is not None:
                await self.session.close_hop(watch.checker)

    def _candidates(self, hop: Hop, exclude: set[str]) -> list:
        """Servers that could check `hop`, nearest first (RTT buckets of `NEAR_S`; random within one)."""
        cands = self.seq.checkers(hop.start, hop.end, exclude=exclude | {hop.peer_id})
        self.rng.shuffle(cands)
        return sorted(cands, key=lambda s: int((self.seq.rtt(s.peer_id) or 0.0) / NEAR_S))

    async def _replay(self, target: Hop, records: list[StepRecord]) -> torch.Tensor:
        """Send `records` (the checked hop's steps from some position on) to `target`; its outputs, concatenated."""
        outs = []
        for i in range(0, len(records), MAX_CHECK_CHUNKS):
            batch = records[i:i + MAX_CHECK_CHUNKS]
            inputs = torch.cat([r.inputs for r in batch], dim=1)
            chunks = [c for r in batch for c in r.chunks]
            outs.append(await self.session.run_hop(target, inputs, batch[0].pos, chunks))
        return torch.cat(outs, dim=1)

    async def check(self, hop: Hop) -> str | None:
        """Check every step of `hop` not yet verified; returns the peer id of a liar found (the hop's
        own, or a checker's), else None. Waits for the checker at most `bound` (see "bounded checks")."""
        watch = self._watches.get(hop)
        if watch is None:
            return None
        unverified = [i for i, r in enumerate(watch.records) if r.pos >= watch.verified]
        if not unverified:
            return None
        asked: list[str] = []  # the checker being asked (or opened), for a timeout to be charged to
        t0 = trio.current_time()
        with trio.move_on_after(self.bound(watch, 0 if watch.checker is None else unverified[0])) as wait:
            compared = await self._compare(hop, watch, asked)
        self.stats["waited_s"] += trio.current_time() - t0
        if wait.cancelled_caught:
            await self._timed_out(watch, asked[-1] if asked else None)
            return None
        if compared is None:
            return None
        checker, records, claimed, got = compared
        self._timeouts.pop(checker.peer_id, None)
        start_pos = records[0].pos
        end_pos = records[-1].pos + records[-1].tokens
        tol = self.config.tol(self.dtype)
        err = relative_error(claimed, got)
        if err <= tol:
            watch.verified = end_pos
            self.policy.verified(hop.peer_id, len(records))
            if self.config.attestations is not None:
                self.config.attestations.verified(hop.peer_id, self.model_id, hop.start, hop.end, len(records))
            self.stats["passed"] += 1
            self.stats["checked_tokens"] += end_pos - start_pos
            self.seq.record_check(hop.peer_id, True)
            self.seq.record_check(checker.peer_id, True)
            return None
        self.stats["mismatches"] += 1
        log.warning("spot check: blocks [%d, %d) at positions [%d, %d): %s and %s differ (relative error %.3g)",
                    hop.start, hop.end, start_pos, end_pos, hop.peer_id[-8:], checker.peer_id[-8:], err)
        verdict = await self._referee(hop, watch, checker, claimed, got, start_pos, end_pos, tol)
        await self._drop_checker(watch)
        if verdict is None:
            self.stats["inconclusive"] += 1
            for p in (hop.peer_id, checker.peer_id):
                self.seq.ban(p, "spot check inconclusive")
                self.policy.failed(p)
                if self.config.attestations is not None:
                    self.config.attestations.failed(p)
            return None
        liar, _referee, _referee_error = verdict
        self.stats["liars"] += 1
        self.policy.failed(liar)
        if self.config.attestations is not None:
            self.config.attestations.failed(liar)
        self.seq.distrust(liar, f"spot check: outputs of blocks [{hop.start}, {hop.end}) differ from two other servers")
        if liar != hop.peer_id:
            watch.verified = end_pos
        if self.billing is not None:
            lied, reference = (hop, got) if liar == hop.peer_id else (checker, claimed)
            proof = _proof(lied, reference, start_pos, tol)
            try:
                await self.billing.dispute(liar, f"spot check failed: blocks [{hop.start}, {hop.end}) "
                                                 f"relative error {err:.3g} > {tol:g}", proof)
            except Exception as e:  # noqa: BLE001 - the ban stands even if the entry fails
                log.warning("could not record the dispute: %s", e)
        return liar

    async def _compare(self, hop: Hop, watch: _Watch, asked: list[str]
                       ) -> tuple[Hop, list[StepRecord], torch.Tensor, torch.Tensor] | None:
        """Open the checker if `hop` has none and replay its unverified steps there:
        (checker, those steps, the hop's outputs, the checker's), or None when nobody could check."""
        records = [r for r in watch.records if r.pos >= watch.verified]
        if watch.checker is None:
            for info in self._candidates(hop, watch.refused | self._slow()):
                asked.append(info.peer_id)
                try:
                    watch.checker = await self.session.open_hop(RouteHop(info.peer_id, hop.start, hop.end), info.addrs)
                    self.seq.note_reached(info.peer_id)  # a session opened: routes may believe its announcement
                    break
                except Refused as e:  # not a fault: no ban, try another (and not this one again for this hop)
                    log.info("checker candidate %s refused: %s", info.peer_id[-8:], e)
                    watch.refused.add(info.peer_id)
                except (P2PError, trio.TooSlowError) as e:
                    self.seq.ban(info.peer_id, f"could not open a checker session: {e}")
            if watch.checker is None:
                self.stats["unchecked"] += 1
                return None
            watch.verified = 0
            records = list(watch.records)
        checker = watch.checker
        asked.append(checker.peer_id)
        claimed = torch.cat([r.outputs for r in records], dim=1)
        self.stats["checks"] += 1
        try:
            got = await self._replay(checker, records)
        except (Refused, P2PError, trio.TooSlowError) as e:
            if not isinstance(e, Refused):
                self.seq.ban(checker.peer_id, f"checker failed: {e}")
            await self._drop_checker(watch)
            self.stats["unchecked"] += 1
            return None
        return checker, records, claimed, got

    async def _timed_out(self, watch: _Watch, peer_id: str | None) -> None:
        """The checker `peer_id` did not answer in time: drop its session; the steps stay unverified."""
        self.stats["timeouts"] += 1
        self.stats["unchecked"] += 1
        if peer_id is not None:
            self._timeouts[peer_id] = self._timeouts.get(peer_id, 0) + 1
            log.info("checker %s did not answer in time (%d in a row): output used unchecked for now",
                     peer_id[-8:], self._timeouts[peer_id])
        await self._drop_checker(watch)

    def _slow(self) -> set[str]:
        """Checkers that missed `max_timeouts` checks in a row: not chosen again in this session."""
        return {p for p, n in self._timeouts.items() if n >= self.config.max_timeouts}

    async def _referee(self, hop: Hop, watch: _Watch, checker: Hop, claimed: torch.Tensor, got: torch.Tensor,
                       start_pos: int, end_pos: int, tol: float) -> tuple[str, str, float] | None:
        """Ask a third server to replay the hop's whole history: (liar, referee, error) or None."""
        if not self.config.referee:
            return None
        for info in self._candidates(hop, {checker.peer_id} | self._slow()):
            ref = None
            try:
                ref = await self.session.open_hop(RouteHop(info.peer_id, hop.start, hop.end), info.addrs)
                self.seq.note_reached(info.peer_id)
                out = await self._replay(ref, list(watch.records))
            except Refused as e:  # not a fault: no ban, ask another
                log.info("referee candidate %s refused: %s", info.peer_id[-8:], e)
                continue
            except (P2PError, trio.TooSlowError) as e:
                self.seq.ban(info.peer_id, f"referee failed: {e}")
                continue
            finally:
                if ref is not None:
                    await self.session.close_hop(ref)
            # the referee's outputs for the positions in question
            offset = 0
            for r in watch.records:
                if r.pos == start_pos:
                    break
                offset += r.tokens
            mine = out[:, offset:offset + (end_pos - start_pos)]
            e_hop, e_chk = relative_error(claimed, mine), relative_error(got, mine)
            if e_chk <= tol < e_hop:
                return hop.peer_id, info.peer_id, e_hop
            if e_hop <= tol < e_chk:
                return checker.peer_id, info.peer_id, e_chk
            return None
        return None

    async def _drop_checker(self, watch: _Watch) -> None:
        checker, watch.checker = watch.checker, None
        watch.verified = 0
        if checker is not None:
            await self.session.close_hop(checker)
