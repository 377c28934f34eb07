"""Hardware tiers: where a server's measured speed places it, and the quarantine after a change of tier.

The tier table (the founding design's) — one place: each tier's name, its price multiplier, and the
effective FLOP/s (measured prefill throughput × FLOPs per block-token, pipeline/server.py) at which a
server reaches it:

    edge         0.05×   ≤ 2 GFLOP/s     phones, single-board computers
    cpu          0.25×     100 GFLOP/s   laptop and desktop CPUs
    consumer     1×         10 TFLOP/s   consumer GPUs
    workstation  3×         50 TFLOP/s   workstation GPUs
    datacenter   8×    ≥   200 TFLOP/s   data-center accelerators

Between two anchors the multiplier interpolates on a log scale of FLOP/s (`tier_multiplier`), so a
fast CPU earns a little more than a slow one; below the first anchor and above the last it is clamped.
A server's tier (`tier_of`) is the highest anchor it reaches.

Multipliers travel as integers in thousandths (`milli`), like a receipt's rate (credits/receipts.py).

Quarantine: a change of tier under the same identity (different hardware) could be an operator
moving a slow server's key to a fast machine to cash in the key's standing, or the reverse. The
server keeps its last tier in its state dir (`TierRecord`, `tier.json`); when the measured tier
differs, for `quarantine_s` seconds it announces the lower of the old and new multipliers
(`settle_tier`). Measurement noise at a boundary costs the same: at worst the lower price for a while.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tier:
    name: str
    multiplier: float
    flops_per_s: float  # the effective FLOP/s at which a server reaches this tier


TIERS = (
    Tier("edge", 0.05, 2e9),
    Tier("cpu", 0.25, 1e11),
    Tier("consumer", 1.0, 1e13),
    Tier("workstation", 3.0, 5e13),
    Tier("datacenter", 8.0, 2e14),
)
TIER_NAMES = tuple(t.name for t in TIERS)
MIN_MILLI = round(TIERS[0].multiplier * 1000)
MAX_MILLI = round(TIERS[-1].multiplier * 1000)
DEFAULT_QUARANTINE_S = 7 * 24 * 3600.0
RECORD_NAME = "tier.json"
MAX_RECORD_BYTES = 4096


def tier_of(flops_per_s: float) -> Tier:
    """The highest tier whose anchor `flops_per_s` reaches (the lowest if none)."""
    reached = [t for t in TIERS if flops_per_s >= t.flops_per_s]
    return reached[-1] if reached else TIERS[0]


def tier_multiplier(flops_per_s: float) -> float:
    """The price multiplier for `flops_per_s`: log-linear between the anchors, clamped at the ends."""
    if math.isnan(flops_per_s) or flops_per_s <= TIERS[0].flops_per_s:
        return TIERS[0].multiplier
    for lo, hi in zip(TIERS, TIERS[1:]):
        if flops_per_s <= hi.flops_per_s:
            f = math.log(flops_per_s / lo.flops_per_s) / math.log(hi.flops_per_s / lo.flops_per_s)
            return math.exp(math.log(lo.multiplier) + f * math.log(hi.multiplier / lo.multiplier))
    return TIERS[-1].multiplier


def tier_milli(flops_per_s: float) -> int:
    """`tier_multiplier` in thousandths, within [MIN_MILLI, MAX_MILLI]."""
    return min(MAX_MILLI, max(MIN_MILLI, round(tier_multiplier(flops_per_s) * 1000)))


@dataclass(frozen=True)
class TierRecord:
    """What a server keeps of its tier: the tier measured last, its multiplier, and a quarantine —
    until when (state-dir time, unix seconds) it announces at most `floor_milli`."""

    tier: str
    milli: int
    floor_milli: int
    quarantine_until: float = 0.0

    def announced_milli(self, now: float) -> int:
        return min(self.milli, self.floor_milli) if now < self.quarantine_until else self.milli

    @classmethod
    def from_value(cls, value: Any) -> "TierRecord":
        if not isinstance(value, dict) or value.get("tier") not in TIER_NAMES:
            raise ValueError("a tier record is a map naming a known tier")
        milli, floor = value.get("milli"), value.get("floor_milli")
        if not (isinstance(milli, int) and isinstance(floor, int)) or isinstance(milli, bool) or isinstance(floor, bool) \
                or not (MIN_MILLI <= milli <= MAX_MILLI and MIN_MILLI <= floor <= MAX_MILLI):
            raise ValueError(f"a tier record's multipliers are integers in [{MIN_MILLI}, {MAX_MILLI}]")
        until = value.get("quarantine_until")
        if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 <= until <= 1e12:
            raise ValueError("a tier record's quarantine_until is a time in unix seconds")
        return cls(value["tier"], milli, floor, float(until))


def read_record(state_dir: str | os.PathLike) -> TierRecord | None:
    """The tier record in `state_dir`; None if there is none (a first start); ValueError if damaged."""
    path = Path(state_dir) / RECORD_NAME
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"{path} is larger than {MAX_RECORD_BYTES} bytes")
    try:
        return TierRecord.from_value(json.loads(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not JSON: {e}") from e


def write_record(state_dir: str | os.PathLike, record: TierRecord) -> None:
    path = Path(state_dir) / RECORD_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)  # a crash leaves the old record or the new one, never half of one


def settle_tier(state_dir: str | os.PathLike | None, flops_per_s: float, now: float,
                quarantine_s: float = DEFAULT_QUARANTINE_S) -> TierRecord:
    """The tier to announce for a start-up measurement of `flops_per_s`, quarantined after a change
    of tier, and kept in `state_dir` (None: nothing kept, no quarantine — a server without a state dir
    has no history under its identity to protect)."""
    measured = tier_of(flops_per_s)
    milli = tier_milli(flops_per_s)
    if state_dir is None:
        return TierRecord(measured.name, milli, milli)
    try:
        old = read_record(state_dir)
    except (OSError, ValueError) as e:
        # the record is ours, so a damaged one is a crash or an operator's edit: quarantine at the
        # lowest tier rather than let an edit lift a quarantine
        log.warning("tier record unreadable (%s): quarantined at the lowest tier", e)
        old = TierRecord(TIERS[0].name, MIN_MILLI, MIN_MILLI, now + quarantine_s)
    if old is None:
        record = TierRecord(measured.name, milli, milli)
    elif old.tier != measured.name:
        floor = min(old.announced_milli(now), milli)
        record = TierRecord(measured.name, milli, floor, now + quarantine_s)
        log.warning("hardware tier changed from %s to %s: announcing %.2f× (the lower) until quarantine ends",
                    old.tier, measured.name, floor / 1000)
    elif now < old.quarantine_until:  # same tier: a quarantine under way goes on (a restart does not end it)
        record = TierRecord(measured.name, milli, old.floor_milli, old.quarantine_until)
    else:
        record = TierRecord(measured.name, milli, milli)
    write_record(state_dir, record)
    return record
