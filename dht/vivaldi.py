"""Vivaldi network coordinates: estimate the RTT to peers never contacted.

Each peer keeps a point in 2-D Euclidean space plus a height (the access-link delay that every path
through it pays), and a confidence (relative error, 1 = knows nothing). Predicted RTT between two
peers is ||x_a - x_b|| + h_a + h_b (seconds). Each RTT sample to a peer whose coordinate came with
the reply moves our point along the spring between the two, by an amount weighted by how sure each
side is (Dabek et al., SIGCOMM 2004, adaptive timestep: cc = ce = 0.25).

Samples come for free: every DHT request measures the RTT of its reply, and every reply carries the
responder's coordinate. Each sample goes through a small per-peer median filter (the last 3
samples), which removes queuing spikes. Convergence from scratch is slow (≈200 random samples per
node for ~12 % median error on a world-wide population); a `--region` hint seed (clusters.py)
starts a node near its true place and brings that to ~5 % within a few dozen samples.

Coordinates from the wire are checked (finite, bounded): a peer can lie about where it is, which
misleads only the estimates that involve that peer.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

CE = 0.25
CC = 0.25
MIN_HEIGHT = 1e-4  # seconds
MAX_COORD = 10.0  # seconds: anything larger is nonsense
INITIAL_ERROR = 1.0


@dataclass(frozen=True, slots=True)
class Coord:
    x: float = 0.0
    y: float = 0.0
    h: float = MIN_HEIGHT
    error: float = INITIAL_ERROR

    def rtt_to(self, other: "Coord") -> float:
        return math.hypot(self.x - other.x, self.y - other.y) + self.h + other.h

    def wire(self) -> list[float]:
        return [self.x, self.y, self.h, self.error]

    @classmethod
    def from_wire(cls, item: object) -> "Coord":
        if type(item) is not list or len(item) != 4:
            raise ValueError("a coordinate is [x, y, height, error]")
        x, y, h, e = item
        if not (type(x) is float and type(y) is float and type(h) is float and type(e) is float):
            for v in item:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError("coordinate components must be numbers")
            x, y, h, e = float(x), float(y), float(h), float(e)
        # comparisons are false for NaN, so this also refuses NaN
        if not (-MAX_COORD <= x <= MAX_COORD and -MAX_COORD <= y <= MAX_COORD and 0 <= h <= MAX_COORD and 0 <= e <= 10):
            raise ValueError("coordinate out of range (or not finite)")
        return cls(x, y, max(h, MIN_HEIGHT), max(min(e, INITIAL_ERROR), 0.01))


class Vivaldi:
    """One peer's coordinate and its update rule."""

    def __init__(self, seed: Coord | None = None, rng: random.Random | None = None):
        self.coord = seed or Coord()
        self.rng = rng or random.Random()
        self.samples = 0
        self._history: dict[str, deque[float]] = {}

    def estimate(self, other: Coord) -> float:
        return self.coord.rtt_to(other)

    def observe(self, peer_id: str, remote: Coord, rtt: float) -> None:
        """Fold one RTT sample (seconds) to a peer at `remote` into our coordinate."""
        if not (rtt > 0 and math.isfinite(rtt)) or rtt > MAX_COORD:
            return
        hist = self._history.get(peer_id)
        if hist is None:
            if len(self._history) > 4096:
                self._history.clear()
            hist = self._history[peer_id] = deque(maxlen=3)
        hist.append(rtt)
        rtt = sorted(hist)[len(hist) // 2]
        me = self.coord
        w = me.error / max(me.error + remote.error, 1e-9)
        predicted = me.rtt_to(remote)
        rel = abs(predicted - rtt) / rtt
        error = min(max(rel * CE * w + me.error * (1 - CE * w), 0.01), INITIAL_ERROR)
        delta = CC * w
        force = delta * (rtt - predicted)
        dx, dy = me.x - remote.x, me.y - remote.y
        norm = math.hypot(dx, dy)
        if norm < 1e-9:  # same spot: push in a random direction
            angle = self.rng.random() * 2 * math.pi
            dx, dy, norm = math.cos(angle), math.sin(angle), 1.0
        # unit vector in 3-D (plane + height), as in the paper's height-vector model
        total = norm + me.h + remote.h
        ux, uy = dx / norm * norm / total, dy / norm * norm / total
        uh = (me.h + remote.h) / total
        x = me.x + force * ux
        y = me.y + force * uy
        h = max(me.h + force * uh, MIN_HEIGHT)
        x = max(-MAX_COORD, min(MAX_COORD, x))
        y = max(-MAX_COORD, min(MAX_COORD, y))
        self.coord = Coord(x, y, min(h, MAX_COORD), error)
        self.samples += 1
