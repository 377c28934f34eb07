"""Grid signals: how green a server's electricity is now, and how much routing may care.

A server may publish its grid signal (`--grid-signal FILE`): a JSON object the operator or a script
refreshes from its grid operator's feed,

    {"load": L, "carbon": C, "renewable": R, "timestamp": unix seconds}

L the grid's load, C its carbon intensity, R its renewable fraction, each normalised to [0, 1]. The
server re-reads the file at each announcement and carries the signal in its signed announcement
(pipeline/announce.py); a file that turns bad later drops the signal (with a log line), never the server.

Routing (pipeline/routing.py) scores a fresh signal

    P_grid = w1·(1 − L) + w2·(1 − C) + w3·R      (w1 + w2 + w3 = 1, so P_grid ∈ [0, 1])

and, with a green preference of weight w, stretches each server's compute time by 1 + w·(1 − P_grid):
a server without a fresh signal counts as P_grid = 0 (a signal can only win preference). Each hop's
cost lies in [cost, (1 + w)·cost], so the chosen route's latency-and-compute cost is never more than
(1 + w) times the fastest route's: `GREEN_WEIGHT` = 0.2 (what `--prefer green` and a request's
`"potluck": {"prefer": "green"}` use) never costs more than 20% of speed, and a server more than 20%
faster always wins over a greener one. `"prefer": "fast"` (the default) is weight 0: signals unused.

A signal is stale — ignored — when older than `max_age` (3 announce periods: 90 s by default) or
stamped more than `FUTURE_SKEW` seconds in the future.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any

from dht.records import InvalidRecord

log = logging.getLogger(__name__)

GREEN_WEIGHT = 0.2  # the most a green preference costs: routes at most 20% slower than the fastest
PREFERENCES = {"fast": 0.0, "green": GREEN_WEIGHT, "cheap": 0.0}  # cheap: prices instead (pipeline/routing.py)
DEFAULT_MAX_AGE = 90.0  # seconds: 3 of the default 30 s announce periods
FUTURE_SKEW = 5.0  # seconds of clock difference tolerated for a timestamp ahead of ours
MAX_FILE_BYTES = 4096


class GridSignalError(ValueError):
    """A grid signal file that cannot be used: unreadable, too large, not JSON, or a bad field."""


@dataclass(frozen=True)
class GridSignal:
    load: float
    carbon: float
    renewable: float
    timestamp: float

    def to_value(self) -> dict:
        return {"load": self.load, "carbon": self.carbon, "renewable": self.renewable, "timestamp": self.timestamp}

    @classmethod
    def from_value(cls, value: Any) -> "GridSignal":
        """Parse a signal (from a file or an announcement); raises InvalidRecord naming the bad field."""
        if not isinstance(value, dict):
            raise InvalidRecord("a grid signal must be a map of load, carbon, renewable and timestamp")

        def number(name: str, hi: float) -> float:
            x = value.get(name)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or not 0 <= x <= hi:
                raise InvalidRecord(f"grid signal field {name!r} must be a number in [0, {hi:g}]")
            return float(x)

        return cls(load=number("load", 1.0), carbon=number("carbon", 1.0), renewable=number("renewable", 1.0),
                   timestamp=number("timestamp", 1e12))

    def fresh(self, now: float, max_age: float = DEFAULT_MAX_AGE) -> bool:
        """Neither older than `max_age` seconds nor stamped in the future (beyond `FUTURE_SKEW`)."""
        return now - max_age <= self.timestamp <= now + FUTURE_SKEW


@dataclass(frozen=True)
class GridMix:
    """w1, w2, w3 of P_grid: how much low load, low carbon and renewables count (normalised to sum 1)."""

    load: float = 1 / 3
    carbon: float = 1 / 3
    renewable: float = 1 / 3

    def score(self, signal: GridSignal) -> float:
        """P_grid ∈ [0, 1]: 1 for an idle, carbon-free, fully renewable grid."""
        total = self.load + self.carbon + self.renewable
        return (self.load * (1 - signal.load) + self.carbon * (1 - signal.carbon)
                + self.renewable * signal.renewable) / total


@dataclass(frozen=True)
class GridPreference:
    """How much a route cares for green servers: `weight` w (0: not at all) at network time `now`."""

    weight: float
    now: float
    max_age: float = DEFAULT_MAX_AGE
    mix: GridMix = GridMix()

    def slowdown(self, signal: GridSignal | None) -> float:
        """The factor in [1, 1 + w] a server's compute time counts for: 1 + w·(1 − P_grid)."""
        green = self.mix.score(signal) if signal is not None and signal.fresh(self.now, self.max_age) else 0.0
        return 1.0 + self.weight * (1.0 - green)


def preference_weight(prefer: str) -> float:
    """The grid weight of a routing preference ("fast", "green" or "cheap"); ValueError for another."""
    if prefer not in PREFERENCES:
        raise ValueError(f"unknown routing preference {prefer!r}: one of {', '.join(PREFERENCES)}")
    return PREFERENCES[prefer]


def read_signal_file(path: str | os.PathLike) -> GridSignal:
    """The signal in a grid signal file; raises GridSignalError saying what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise GridSignalError(f"cannot read grid signal file {path}: {e.strerror or e}") from e
    if len(data) > MAX_FILE_BYTES:
        raise GridSignalError(f"grid signal file {path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GridSignalError(f"grid signal file {path} is not JSON: {e}") from e
    try:
        return GridSignal.from_value(value)
    except InvalidRecord as e:
        raise GridSignalError(f"grid signal file {path}: {e}") from e


@dataclass
class GridSignalFile:
    """A server's grid signal file, re-read at each announcement (`current`)."""

    path: str
    max_age: float = DEFAULT_MAX_AGE

    def check(self) -> GridSignal:
        """Read it once at start: a bad file is the operator's mistake, raised (GridSignalError)."""
        return read_signal_file(self.path)

    def current(self, now: float) -> GridSignal | None:
        """The signal to announce now; None (with a log line) when the file turned bad or the signal is stale."""
        try:
            signal = read_signal_file(self.path)
        except GridSignalError as e:
            log.warning("grid signal dropped: %s", e)
            return None
        if not signal.fresh(now, self.max_age):
            log.warning("grid signal dropped: %s is stamped %.0f s from now (at most %.0f s old, none ahead)",
                        self.path, signal.timestamp - now, self.max_age)
            return None
        return signal
