"""Spot checks: the client re-runs a random fraction of steps on a second server and compares outputs.

Choice — *lazy shadow sessions*. A decode step cannot be re-run alone: its output depends on the
KV cache of every earlier step. The options were (a) shadow every step of a sampled session on a
second server (100 % extra decode work for that session, paid whether or not anyone lies), (b) check
only prefill steps (stateless, cheap, but a liar that is honest on prefills and lies on decode steps
is never caught), or (c) what we do: the client keeps, per hop, what it sent and got back
(inputs, chunks, outputs of every step; the session keeps the inputs anyway for fault recovery).
Each step is selected with probability `fraction` (default 2 %); when a step of hop H is selected,
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
  unchecked lie already changed cannot be undone (with fraction 1.0, nothing is ever used unchecked).

On a mismatch a referee R (a third server for the span) replays H's whole history in a fresh session;
the server R disagrees with is the liar (if R agrees with neither, or no third server exists, the
check is inconclusive: both are banned for a while, nobody is accused). The liar is distrusted by the
route (never used again by this client), and, with billing, gets a signed *dispute* entry on the
client's chain whose evidence holds the span, positions, hashes of the inputs and of the three
outputs, and the errors. Checker and referee sessions are ordinary sessions: the client pays them
with receipts like any hop. Comparison: per token, ‖a − b‖₂ / ‖b‖₂ ≤ `tolerance` (default 1e-3 for
float32, 5e-2 for bfloat16 — different hardware gives different rounding, a lie is far larger).
Not done: a client that holds the blocks itself does not referee locally yet.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from p2p.errors import P2PError

if TYPE_CHECKING:
    from .client import InferenceSession, _Hop

log = logging.getLogger(__name__)

MAX_CHECK_CHUNKS = 1024  # chunks per check message (the protocol allows 4096)


@dataclass
class SpotCheckConfig:
    fraction: float = 0.02  # probability that a step (of each hop) is checked
    tolerance: float | None = None  # max per-token relative L2 error; None: by dtype
    referee: bool = True  # on a mismatch, ask a third server
    seed: int | None = None

    def tol(self, dtype: torch.dtype) -> float:
        if self.tolerance is not None:
            return self.tolerance
        return 5e-2 if dtype == torch.bfloat16 else 1e-3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over tokens of ‖a − b‖₂ / ‖b‖₂ (a, b: [1, n, hidden])."""
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    num = (a - b).norm(dim=-1)
    den = b.norm(dim=-1).clamp_min(1e-6)
    return float((num / den).max()) if num.numel() else 0.0


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).digest()


class SpotChecker:
    """One session's spot checks (see the module docstring)."""

    def __init__(self, session: "InferenceSession", config: SpotCheckConfig):
        self.session = session
        self.config = config
        self.rng = random.Random(config.seed) if config.seed is not None else random.Random()
        self.stats = {"checks": 0, "passed": 0, "mismatches": 0, "liars": 0, "inconclusive": 0, "unchecked": 0,
                      "checked_tokens": 0}

    def selected(self) -> bool:
        return self.config.fraction > 0 and self.rng.random() < self.config.fraction

    @property
    def seq(self):
        return self.session.model.sequence

    async def _open(self, peer_start_end: tuple[str, int, int], addr: str | None) -> "_Hop":
        from .client import _Hop
        from .routing import RouteHop

        m = self.session.model
        hop = await _Hop.open(m.network, RouteHop(*peer_start_end), addr, model_id=m.model_id,
                              max_length=self.session.max_length, dtype=m.dtype_name,
                              timeout=m.config_client.open_timeout)
        hop.is_checker = True
        self.session.extra_hops.append(hop)
        return hop

    def _candidates(self, hop: "_Hop", exclude: set[str]) -> list:
        cands = self.seq.checkers(hop.start, hop.end, exclude=exclude | {hop.peer_id})
        self.rng.shuffle(cands)
        return cands

    async def _replay(self, target: "_Hop", entries: list, pos: int) -> torch.Tensor:
        """Send `entries` (the checked hop's steps from `pos` on) to `target`; its outputs, concatenated."""
        outs = []
        for i in range(0, len(entries), MAX_CHECK_CHUNKS):
            batch = entries[i:i + MAX_CHECK_CHUNKS]
            inputs = torch.cat([e[1] for e in batch], dim=1)
            chunks = [c for e in batch for c in e[2]]
            outs.append(await self.session._run_hop(target, inputs, batch[0][0], chunks))
        return torch.cat(outs, dim=1)

    async def check(self, hop: "_Hop") -> str | None:
        """Check every step of `hop` not yet verified; returns the peer id of a liar found (the hop's
        own, or a checker's), else None."""
        entries = [e for e in hop.entries if e[0] >= hop.verified]
        if not entries:
            return None
        if hop.checker is None:
            for info in self._candidates(hop, set()):
                try:
                    hop.checker = await self._open((info.peer_id, hop.start, hop.end), info.addr)
                    break
                except (P2PError, trio.TooSlowError) as e:
                    self.seq.ban(info.peer_id, f"could not open a checker session: {e}")
            if hop.checker is None:
                self.stats["unchecked"] += 1
                return None
            hop.verified = 0
            entries = list(hop.entries)
        checker = hop.checker
        start_pos = entries[0][0]
        end_pos = entries[-1][0] + entries[-1][1].shape[1]
        claimed = torch.cat([e[3] for e in entries], dim=1)
        self.stats["checks"] += 1
        try:
            got = await self._replay(checker, entries, start_pos)
        except (P2PError, trio.TooSlowError) as e:
            self.seq.ban(checker.peer_id, f"checker failed: {e}")
            await self._drop_checker(hop)
            self.stats["unchecked"] += 1
            return None
        tol = self.config.tol(self.session.model.dtype)
        err = relative_error(claimed, got)
        if err <= tol:
            hop.verified = end_pos
            self.stats["passed"] += 1
            self.stats["checked_tokens"] += end_pos - start_pos
            self.seq.record_check(hop.peer_id, True)
            self.seq.record_check(checker.peer_id, True)
            return None
        self.stats["mismatches"] += 1
        log.warning("spot check: blocks [%d, %d) at positions [%d, %d): %s and %s differ (relative error %.3g)",
                    hop.start, hop.end, start_pos, end_pos, hop.peer_id[-8:], checker.peer_id[-8:], err)
        verdict = await self._referee(hop, checker, claimed, got, start_pos, end_pos, tol)
        await self._drop_checker(hop)
        if verdict is None:
            self.stats["inconclusive"] += 1
            for p in (hop.peer_id, checker.peer_id):
                self.seq.ban(p, "spot check inconclusive")
            return None
        liar, referee, ref_err = verdict
        honest = checker.peer_id if liar == hop.peer_id else hop.peer_id
        self.stats["liars"] += 1
        self.seq.distrust(liar, f"spot check: outputs of blocks [{hop.start}, {hop.end}) differ from two other servers")
        if liar != hop.peer_id:
            hop.verified = end_pos
        billing = self.session.model.config_client.billing
        if billing is not None:
            inputs = torch.cat([e[1] for e in entries], dim=1)
            evidence = {
                "model": self.session.model.model_id, "start": hop.start, "end": hop.end,
                "positions": [start_pos, end_pos], "inputs_sha256": _digest(inputs),
                "accused_output_sha256": _digest(claimed if liar == hop.peer_id else got),
                "witness_output_sha256": _digest(got if liar == hop.peer_id else claimed),
                "witnesses": [honest, referee], "relative_error": err, "referee_error": ref_err, "tolerance": tol,
            }
            try:
                await billing.dispute(liar, f"spot check failed: blocks [{hop.start}, {hop.end}) "
                                            f"relative error {err:.3g} > {tol:g}", evidence)
            except Exception as e:  # noqa: BLE001 - the ban stands even if the entry fails
                log.warning("could not record the dispute: %s", e)
        return liar

    async def _referee(self, hop: "_Hop", checker: "_Hop", claimed: torch.Tensor, got: torch.Tensor,
                       start_pos: int, end_pos: int, tol: float) -> tuple[str, str, float] | None:
        """Ask a third server to replay the hop's whole history: (liar, referee, error) or None."""
        if not self.config.referee:
            return None
        for info in self._candidates(hop, {checker.peer_id}):
            ref = None
            try:
                ref = await self._open((info.peer_id, hop.start, hop.end), info.addr)
                out = await self._replay(ref, list(hop.entries), 0)
            except (P2PError, trio.TooSlowError) as e:
                self.seq.ban(info.peer_id, f"referee failed: {e}")
                continue
            finally:
                if ref is not None:
                    await self.session._close_hop(ref)
            # the referee's outputs for the positions in question
            offset = 0
            for entry in hop.entries:
                if entry[0] == start_pos:
                    break
                offset += entry[1].shape[1]
            mine = out[:, offset:offset + (end_pos - start_pos)]
            e_hop, e_chk = relative_error(claimed, mine), relative_error(got, mine)
            if e_chk <= tol < e_hop:
                return hop.peer_id, info.peer_id, e_hop
            if e_hop <= tol < e_chk:
                return checker.peer_id, info.peer_id, e_chk
            return None
        return None

    async def _drop_checker(self, hop: "_Hop") -> None:
        checker, hop.checker = hop.checker, None
        hop.verified = 0
        if checker is not None:
            await self.session._close_hop(checker)
