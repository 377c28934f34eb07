"""Coral-style cluster levels chosen by measured RTT, with no coordinator.

Levels: 0 is the global DHT (everyone). Level L ≥ 1 has an RTT threshold T_L (default level 1 <
100 ms, level 2 < 30 ms; configurable, any number of levels, tighter thresholds at higher levels).
A node uses the same node id at every level (Coral) and keeps one routing table per level holding
only members of its cluster at that level, so a key stored in its level-2 cluster lives at the
XOR-closest members of that cluster and any member finds it without leaving the cluster.

Membership without a coordinator — landmark election by distance-bounded minimum gossip:
- A cluster is named by its *landmark*, a peer id. At each level a node holds (label, dist,
  parent): the landmark it follows, its RTT distance to it along the chain of peers the label came
  through, and the neighbour it came from. A node starts as its own landmark (dist 0).
- Every DHT message carries the sender's (label, dist) per level. A node that hears (X, d) from
  peer q, with RTT r to q (measured if we have talked to q; else Vivaldi's estimate, but only once
  both coordinates report an error under 25 % — an unconverged estimate must not seed a label), computes
  d' = d + r and adopts X when d' < T_L and X has a lower node id (sha256 of the peer id) than its
  current label, or X is its label and d' is shorter. So the label of the lowest-id peer spreads
  outward from it hop by hop, but never past RTT distance T_L: a cluster is the ball of radius T_L
  (measured along real paths, which by the triangle inequality bounds the direct RTT) around the
  lowest-id landmark that reaches a node. Peers of one metro/region — all well within T_L of each
  other — converge on one label.
- Updates from the parent refresh dist (maintenance pings the parent of each level); if the parent switches labels or its dist grows past
  T_L × 1.25 (hysteresis against RTT noise), the node falls back to itself and re-elects from what
  it hears next. Loops cannot keep a label alive by themselves: each round trip adds RTT until the
  bound is crossed ("count to T_L", not to infinity).
- No coordinates of landmarks are needed, so a drifting Vivaldi embedding cannot make labels stale;
  Vivaldi serves the upper layers' estimates for peers never measured. A landmark that leaves keeps naming its
  cluster as long as the chain that carries its label holds.
- The `--region` hint only seeds: it places the node's initial Vivaldi coordinate at the region's
  nominal position (great-circle geometry in seconds of RTT, the same scale Vivaldi learns), so
  estimates are sensible before the first samples; measured RTT then moves the coordinate and
  decides membership.

Known limits: a peer can lie about its coordinate or advertise a fake low-id landmark near a
victim, merging clusters it should not — which costs latency (lookups look in a bigger cluster),
never correctness (level 0 is always searched last, and records are signed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from .ids import node_id
from .vivaldi import Coord

DEFAULT_THRESHOLDS: dict[int, float] = {1: 0.100, 2: 0.030}
HYSTERESIS = 1.25

# Nominal positions (lat, lon) for `--region` hints; also used by the simulator bench.
REGIONS: dict[str, tuple[float, float]] = {
    "us-east": (39.0, -77.5),
    "us-central": (41.9, -87.6),
    "us-west": (37.4, -122.0),
    "ca-central": (43.7, -79.4),
    "br-south": (-23.5, -46.6),
    "mx": (19.4, -99.1),
    "eu-west": (48.9, 2.35),
    "uk": (51.5, -0.1),
    "eu-central": (50.1, 8.7),
    "eu-north": (59.3, 18.1),
    "eu-south": (41.9, 12.5),
    "ru": (55.8, 37.6),
    "tr": (41.0, 29.0),
    "ng": (6.5, 3.4),
    "za": (-26.2, 28.0),
    "eg": (30.0, 31.2),
    "in-west": (19.1, 72.9),
    "in-south": (13.0, 77.6),
    "id": (-6.2, 106.8),
    "sg": (1.35, 103.8),
    "cn-east": (31.2, 121.5),
    "cn-north": (39.9, 116.4),
    "jp": (35.7, 139.7),
    "kr": (37.6, 127.0),
    "au-east": (-33.9, 151.2),
}

EARTH_RADIUS_KM = 6371.0
SECONDS_PER_KM_RTT = 1.5 * 2 / 200_000.0  # round trip at 2/3 c (≈200,000 km/s), paths 1.5× the great circle


def region_seed(region: str | None, rng: random.Random | None = None) -> Coord | None:
    """A starting Vivaldi coordinate for a region hint (None for unknown or no hint).

    Azimuthal equidistant projection around (30 N, 20 E), scaled to seconds of RTT, so that
    distances from most regions to most others are roughly right; Vivaldi corrects the rest."""
    if not region or region not in REGIONS:
        return None
    lat, lon = (math.radians(v) for v in REGIONS[region])
    lat0, lon0 = math.radians(30.0), math.radians(20.0)
    cos_c = math.sin(lat0) * math.sin(lat) + math.cos(lat0) * math.cos(lat) * math.cos(lon - lon0)
    c = math.acos(max(-1.0, min(1.0, cos_c)))
    k = c / math.sin(c) if c > 1e-9 else 1.0
    x = k * math.cos(lat) * math.sin(lon - lon0)
    y = k * (math.cos(lat0) * math.sin(lat) - math.sin(lat0) * math.cos(lat) * math.cos(lon - lon0))
    scale = EARTH_RADIUS_KM * SECONDS_PER_KM_RTT
    rng = rng or random.Random()
    jitter = 0.001
    return Coord(x * scale + rng.uniform(-jitter, jitter), y * scale + rng.uniform(-jitter, jitter), 0.005, 0.9)


@dataclass
class Label:
    landmark: str
    dist: float = 0.0
    parent: str | None = None  # None: we are the landmark
    rank: int = field(default=-1)

    def __post_init__(self) -> None:
        if self.rank < 0:
            self.rank = node_id(self.landmark)


class Clusters:
    """The node's label (landmark peer id) at each level ≥ 1; level 0 is global and has none."""

    def __init__(self, self_peer_id: str, thresholds: dict[int, float] | None = None, hysteresis: float = HYSTERESIS):
        self.self_peer_id = self_peer_id
        self.thresholds = dict(sorted((thresholds if thresholds is not None else DEFAULT_THRESHOLDS).items()))
        for level, t in self.thresholds.items():
            if level < 1 or not t > 0:
                raise ValueError("cluster levels are integers ≥ 1 with a positive RTT threshold")
        self.hysteresis = hysteresis
        self._labels: dict[int, Label] = {level: Label(self_peer_id) for level in self.thresholds}

    @property
    def levels(self) -> list[int]:
        """All levels, tightest first, ending with 0 (global)."""
        return sorted(self.thresholds, reverse=True) + [0]

    def label(self, level: int) -> str:
        return "" if level == 0 else self._labels[level].landmark

    def labels(self) -> dict[int, str]:
        return {level: lab.landmark for level, lab in self._labels.items()}

    def distance(self, level: int) -> float:
        return self._labels[level].dist

    def wire(self) -> list:
        """[[level, landmark, dist], ...] for piggybacking on messages."""
        return [[level, lab.landmark, lab.dist] for level, lab in self._labels.items()]

    def heard(self, peer_id: str, adverts: dict[int, tuple[str, float]], rtt: float) -> list[int]:
        """Peer `peer_id`, at RTT `rtt`, advertises {level: (landmark, its distance to it)}.
        Returns the levels whose label changed."""
        changed = []
        for level, threshold in self.thresholds.items():
            advert = adverts.get(level)
            lab = self._labels[level]
            if advert is None:
                continue
            landmark, d = advert
            if landmark == self.self_peer_id:
                continue  # our own label coming back: we are the root of it
            via = d + rtt
            if lab.parent == peer_id:
                if landmark == lab.landmark and via <= threshold * self.hysteresis:
                    lab.dist = via
                    continue
                lab = self._labels[level] = Label(self.self_peer_id)  # parent left our cluster: re-elect
                changed.append(level)
            if via >= threshold:
                continue
            if landmark == lab.landmark:
                if via < lab.dist:
                    lab.dist, lab.parent = via, peer_id
                continue
            rank = node_id(landmark)
            if rank < lab.rank:
                self._labels[level] = Label(landmark, via, peer_id, rank)
                if level not in changed:
                    changed.append(level)
        return changed
