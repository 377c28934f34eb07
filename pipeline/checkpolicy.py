"""Which steps the spot checker checks: a fixed fraction, or trust earned server by server.

`AdaptivePolicy` follows BOINC's adaptive replication. The client keeps, per server (peer id), the
number of its consecutive steps a check has verified (`TrustRecord.verified`):

- *probation* (fewer than `trust_after` verified steps — a server new to this client, or one whose
  check recently failed): every one of its steps is checked before its output is used. With lazy
  shadow sessions (pipeline/spotcheck.py) that costs one checker pass over the server's sessions
  — the same compute as checking each session once at its end — but no unchecked output is ever
  used, so a liar that lies from any step k on is caught at step k, before the lie reaches the
  generation;
- *trusted*: each step is checked with probability max(`floor`, `scale` / verified), falling as the
  record grows. A check verifies every step of the hop since the previous one, so a lie is caught
  at the first check after it in the same hop session;
- any failed or inconclusive check resets the server's count to 0 (back to probation; a confirmed
  liar is also distrusted by the route, pipeline/routing.py).

Measured (bench/spotcheck.py, tiny model, 32-token generations, 50 per case): a liar new to the
client, lying on 100 %, 5 % or 1 % of its steps, is caught in every generation it lies in, on the
step it lies on, and greedy output always equals local (also with the liar as a real peer
process); the fixed 2 % caught it in 58 %, 43 %, 47 % of those generations, after a median of
21, 15, 17 of its steps, with the lies used meanwhile. The price of trust: a liar that first earned
1,000 verified steps is caught in only 3–7 % of the generations it lies in (the floor's bet: each
such generation is a fresh chance, and a catch costs it its record and the route for good). Checker
compute per token, honest swarm, 60 generations by one client: 0.17 overall and 0.05 over the last
quarter (1.0 in the first, on probation), against 0.30 and 0.34 for the fixed 2 % (lazy shadow
sessions make a fixed 2 % per step cost about a third of the session: one check re-runs everything
before it).

The records live in memory, one `AdaptivePolicy` per `SpotCheckConfig`, i.e. per client model in a
peer process: a restarted client puts every server on probation again (bounded: at most
`max_servers` records, the least recently seen dropped first). `FixedPolicy` is the old behaviour,
every step with the same probability; tests and the benchmark baseline use it
(`SpotCheckConfig(fraction=...)`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol


class CheckPolicy(Protocol):
    """What the spot checker asks of a selection policy."""

    def probability(self, peer_id: str) -> float:
        """The probability that the step `peer_id` just served is checked now."""

    def verified(self, peer_id: str, steps: int) -> None:
        """A check confirmed `steps` more steps of `peer_id`."""

    def failed(self, peer_id: str) -> None:
        """A check of `peer_id` failed or was inconclusive."""


@dataclass(frozen=True)
class FixedPolicy:
    """Every step checked with probability `fraction`, whoever served it."""

    fraction: float

    def probability(self, peer_id: str) -> float:
        return self.fraction

    def verified(self, peer_id: str, steps: int) -> None:
        pass

    def failed(self, peer_id: str) -> None:
        pass


@dataclass
class TrustRecord:
    verified: int = 0  # consecutive steps of this server verified by checks
    failures: int = 0  # checks it failed, ever (kept for reporting)


@dataclass
class AdaptivePolicy:
    """Per-server trust earned by verified steps (see the module docstring)."""

    trust_after: int = 64  # verified steps a server needs before it is checked at random
    scale: float = 1.0  # trusted: probability scale / verified (1/64 ≈ 1.6 % at trust) ...
    floor: float = 0.002  # ... but never below this
    max_servers: int = 4096  # records kept (least recently seen dropped first)
    records: OrderedDict[str, TrustRecord] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.trust_after < 0 or self.scale < 0 or not 0.0 <= self.floor <= 1.0 or self.max_servers < 1:
            raise ValueError("AdaptivePolicy: trust_after, scale >= 0; floor in [0, 1]; max_servers >= 1")

    def record(self, peer_id: str) -> TrustRecord:
        rec = self.records.pop(peer_id, None) or TrustRecord()
        self.records[peer_id] = rec  # most recently seen last
        while len(self.records) > self.max_servers:
            self.records.popitem(last=False)
        return rec

    def trusted(self, peer_id: str) -> bool:
        rec = self.records.get(peer_id)
        return rec is not None and rec.verified >= self.trust_after

    def probability(self, peer_id: str) -> float:
        rec = self.record(peer_id)
        if rec.verified < self.trust_after:
            return 1.0
        return min(1.0, max(self.floor, self.scale / max(rec.verified, 1)))

    def verified(self, peer_id: str, steps: int) -> None:
        self.record(peer_id).verified += max(0, steps)

    def failed(self, peer_id: str) -> None:
        rec = self.record(peer_id)
        rec.verified = 0
        rec.failures += 1
