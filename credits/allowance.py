"""How many entries without work behind them one author may add to this peer's store, over time.

An earn or spend entry carries a receipt that a second key signed, priced by the pricing function:
work, at about one entry per session a server serves, each under a KiB. A grant, dispute or fork
entry carries only its author's word, and a dispute may carry 12 KiB of evidence; honest authors
write few of them (a starting grant, a dispute per failed spot check). Unbounded, one author could
sign thousands and every peer would replicate and keep them. So each author has a token bucket of
`burst_entries` such entries and `burst_bytes` of their wire bytes, refilled at `entries_per_hour`
and `bytes_per_hour` by this peer's clock. Ingestion stops before an entry the bucket cannot pay for
(keeping what came before it, like any refused entry) and replication leaves the author alone until
its bucket could pay for any entry again. Receipt-backed entries are never counted, so earning is
not slowed; the swarm's grant authorities are not counted either.

The buckets are this peer's own defence, not swarm policy: peers converge on the same chains once
the buckets refill, whatever limits each one uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .entry import MAX_ENTRY_BYTES

BACKED_KINDS = frozenset({"earn", "spend"})  # entries carrying a receipt a second key signed


@dataclass(frozen=True)
class IngestLimits:
    """Per author: entries without a receipt, and their bytes, taken in a burst and per hour."""

    burst_entries: int = 128
    burst_bytes: int = 512 * 1024
    entries_per_hour: float = 60.0
    bytes_per_hour: float = 64 * 1024

    def __post_init__(self) -> None:
        if self.burst_entries < 1 or self.burst_bytes < MAX_ENTRY_BYTES:
            raise ValueError(f"a burst must hold at least one entry of {MAX_ENTRY_BYTES} bytes")
        if self.entries_per_hour <= 0 or self.bytes_per_hour <= 0:
            raise ValueError("refill rates are positive")


@dataclass(slots=True)
class _Bucket:
    entries: float
    size: float
    at: float


class Allowances:
    """One token bucket per author (see the module docstring); `clock` is seconds."""

    def __init__(self, limits: IngestLimits, clock: Callable[[], float]):
        self.limits = limits
        self.clock = clock
        self._buckets: dict[bytes, _Bucket] = {}

    def _refilled(self, bucket: _Bucket, now: float) -> tuple[float, float]:
        limits = self.limits
        hours = max(0.0, now - bucket.at) / 3600
        return (min(limits.burst_entries, bucket.entries + hours * limits.entries_per_hour),
                min(limits.burst_bytes, bucket.size + hours * limits.bytes_per_hour))

    def take(self, author: bytes, size: int) -> bool:
        """Pay for one unbacked entry of `size` wire bytes by `author`; False (nothing taken) if it cannot."""
        now = self.clock()
        bucket = self._buckets.get(author)
        if bucket is None:
            bucket = self._buckets[author] = _Bucket(self.limits.burst_entries, self.limits.burst_bytes, now)
        entries, available = self._refilled(bucket, now)
        if entries < 1 or available < size:
            return False
        bucket.entries, bucket.size, bucket.at = entries - 1, available - size, now
        return True

    def spent(self, author: bytes) -> bool:
        """True while `author`'s bucket could not pay for an entry of the largest size (reads only)."""
        bucket = self._buckets.get(author)
        if bucket is None or (bucket.entries >= 1 and bucket.size >= MAX_ENTRY_BYTES):
            return False  # (buckets only refill between takes)
        entries, available = self._refilled(bucket, self.clock())
        return entries < 1 or available < MAX_ENTRY_BYTES
