"""Coral-style cluster levels chosen by measured RTT, with no coordinator.

Levels: 0 is the global DHT (everyone). Level L ≥ 1 has an RTT threshold T_L (default level 1 <
100 ms, level 2 < 30 ms; configurable, any number of levels, tighter thresholds at higher levels):
the most a member may be from its cluster's landmark, access links left out (see below).
A node uses the same node id at every level (Coral) and keeps one routing table per level holding
only members of its cluster at that level, so a key stored in its level-2 cluster lives at the
XOR-closest members of that cluster and any member finds it without leaving the cluster.

Membership without a coordinator — landmark election by minimum gossip over balls in the network
core:
- A cluster is named by its *landmark*, a peer id, and centred on the landmark's Vivaldi coordinate.
  At each level a node holds a label: the landmark it follows, the landmark's coordinate as the
  landmark last advertised it, how long ago the landmark vouched for it (its *age*), the node's
  distance to the landmark, and the neighbour the freshest word came from (its parent). A node
  starts as its own landmark (distance 0, age 0).
- Every DHT message carries the sender's label per level. A node that hears landmark X from peer q
  adopts X when X has a lower node id (sha256 of the peer id) than its current landmark and its
  distance to X is under T_L. So the label of the lowest-id landmark spreads outward from it, but
  never past distance T_L from it: a cluster is the ball of radius T_L around the lowest-id
  landmark that reaches a node.
- The distance to a landmark is the smallest of two estimates: its distance *through the network
  core*, ||x_self − x_X|| in Vivaldi's plane without the two heights (once both coordinates report
  an error under the trust bound — an unconverged estimate must not seed a label), and the
  path bound d_q + rtt(q) along the chain of peers the label came through (measured RTT, which by
  the triangle inequality bounds the direct RTT; the only estimate before Vivaldi converges).
  Heights are left out on purpose: they are each peer's access link, paid on every path whatever
  the cluster, and counting them split metros by who has a slow last mile — at 10,000 simulated
  peers chains of accumulated last miles crossed 30 ms within two or three hops and a region ended
  in dozens of clusters.
- Liveness by age, not by distance: the landmark advertises its label with age 0; everyone else
  passes it on with the age it heard plus the time it has held it, keeping the freshest word (and
  the landmark coordinate that came with it). A label older than `max_age` is dropped (the node
  falls back to itself and re-elects from what it hears next), so a landmark that left or now
  follows another stops naming a cluster within `max_age`, and loops cannot keep a label alive —
  age only grows around them. Maintenance pings each label's parent (and, when the word is getting
  old, the landmark itself) so live labels stay fresh.
- When neither estimate can decide (a coordinate not yet trusted, and a path bound over T_L), the
  node pings the landmark itself: the measured RTT is then a path bound of one hop. A node that
  hears from its landmark that the landmark now follows another re-elects at once.
- If the distance to the landmark grows past T_L × 1.25 (hysteresis against RTT noise and
  coordinate drift), the node falls back to itself and re-elects.
- The `--region` hint only seeds: it places the node's initial Vivaldi coordinate at the region's
  nominal position (great-circle geometry in seconds of RTT, the same scale Vivaldi learns), so
  estimates are sensible before the first samples; measured RTT then moves the coordinate and
  decides membership.

Known limits: a ball's edge can cut a metro in two when a landmark sits about T_L away from it.
A peer can lie about its coordinate or advertise a fake low-id landmark near a victim, merging
clusters it should not — which costs latency (lookups look in a bigger cluster), never correctness
(level 0 is always searched last, and records are signed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from .ids import node_id
from .vivaldi import Coord

DEFAULT_THRESHOLDS: dict[int, float] = {1: 0.100, 2: 0.030}
HYSTERESIS = 1.25
MAX_AGE = 600.0  # seconds a label lives without fresh word from its landmark
TRUST_BELOW = 0.25  # Vivaldi error under which a coordinate may decide a label

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


@dataclass(frozen=True, slots=True)
class Advert:
    """What a peer says about its label at one level."""

    landmark: str
    dist: float  # its distance to the landmark (seconds)
    age: float  # seconds since the landmark vouched for the label
    centre: Coord  # the landmark's coordinate, as the landmark advertised it


@dataclass
class Label:
    landmark: str
    centre: Coord | None  # None: we are the landmark (our own coordinate is the centre)
    chain: float = 0.0  # path bound: the parent's distance plus our RTT to the parent
    vouched: float = 0.0  # local time at which the landmark vouched for the freshest word we have
    parent: str | None = None  # None: we are the landmark
    rank: int = 0  # node id of the landmark: the lower wins


def core_distance(a: Coord, b: Coord) -> float:
    """Vivaldi's estimate without the two heights (access links): distance through the core."""
    return math.hypot(a.x - b.x, a.y - b.y)


class Clusters:
    """The node's label (landmark peer id) at each level ≥ 1; level 0 is global and has none."""

    def __init__(self, self_peer_id: str, thresholds: dict[int, float] | None = None, *,
                 hysteresis: float = HYSTERESIS, max_age: float = MAX_AGE, trust_below: float = TRUST_BELOW):
        self.self_peer_id = self_peer_id
        self.thresholds = dict(sorted((thresholds if thresholds is not None else DEFAULT_THRESHOLDS).items()))
        for level, t in self.thresholds.items():
            if level < 1 or not t > 0:
                raise ValueError("cluster levels are integers ≥ 1 with a positive RTT threshold")
        self.hysteresis = hysteresis
        self.max_age = max_age
        self.trust_below = trust_below
        self._ranks: dict[str, int] = {}
        self._labels: dict[int, Label] = {level: self._own() for level in self.thresholds}
        self._unsure: set[str] = set()

    def _own(self) -> Label:
        return Label(self.self_peer_id, None, rank=self._rank(self.self_peer_id))

    def _rank(self, landmark: str) -> int:
        rank = self._ranks.get(landmark)
        if rank is None:
            if len(self._ranks) > 4096:
                self._ranks.clear()
            rank = self._ranks[landmark] = node_id(landmark)
        return rank

    @property
    def levels(self) -> list[int]:
        """All levels, tightest first, ending with 0 (global)."""
        return sorted(self.thresholds, reverse=True) + [0]

    def label(self, level: int) -> str:
        return "" if level == 0 else self._labels[level].landmark

    def labels(self) -> dict[int, str]:
        return {level: lab.landmark for level, lab in self._labels.items()}

    def parents(self) -> list[str]:
        """The peers our labels came through (maintenance pings them to keep the word fresh)."""
        return list({lab.parent for lab in self._labels.values() if lab.parent is not None})

    def aging(self, now: float) -> list[str]:
        """Landmarks whose word is past half its life: worth asking directly."""
        return list({lab.landmark for lab in self._labels.values()
                     if lab.parent is not None and now - lab.vouched > self.max_age / 2})

    def take_unsure(self) -> list[str]:
        """Lower-id landmarks heard of whose distance we could not judge (no trusted coordinate,
        and a path bound over the threshold): measuring the RTT to them directly decides."""
        out, self._unsure = list(self._unsure), set()
        return out

    def trusted(self, coord: Coord) -> bool:
        """Is this coordinate sure enough to decide a label?"""
        return coord.error < self.trust_below

    def _core(self, me: Coord, centre: Coord) -> float:
        """The core distance to a landmark at `centre`, or infinity while either coordinate is unsure."""
        return core_distance(me, centre) if self.trusted(me) and self.trusted(centre) else math.inf

    def distance(self, level: int, me: Coord) -> float:
        """Our distance to our landmark at `level`: the smaller of the core and path estimates."""
        lab = self._labels[level]
        return 0.0 if lab.centre is None else min(lab.chain, self._core(me, lab.centre))

    def wire(self, me: Coord, now: float) -> list:
        """[[level, landmark, dist, age, centre], ...] for piggybacking on messages."""
        out = []
        for level, lab in self._labels.items():
            if lab.centre is None:
                out.append([level, lab.landmark, 0.0, 0.0, me.wire()])
            else:
                out.append([level, lab.landmark, self.distance(level, me), max(now - lab.vouched, 0.0), lab.centre.wire()])
        return out

    def heard(self, peer_id: str, adverts: dict[int, Advert], rtt: float | None, me: Coord, now: float) -> list[int]:
        """Peer `peer_id`, at RTT `rtt` (None: not known well enough), advertises its labels.
        Returns the levels whose label changed."""
        changed = []
        for level, threshold in self.thresholds.items():
            advert = adverts.get(level)
            if advert is None or advert.landmark == self.self_peer_id or advert.age > self.max_age:
                continue  # our own label coming back (we are its root), or word too old to use
            lab = self._labels[level]
            chain = advert.dist + rtt if rtt is not None else math.inf
            vouched = now - advert.age
            if peer_id == lab.landmark and advert.landmark != peer_id:
                lab = self._labels[level] = self._own()  # our landmark follows another now: re-elect
                changed.append(level)
            if advert.landmark == lab.landmark:
                # the parent's word replaces our path bound (its distance may have grown); others' can shorten it
                lab.chain = chain if peer_id == lab.parent and rtt is not None else min(chain, lab.chain)
                if vouched > lab.vouched:
                    lab.vouched, lab.centre, lab.parent = vouched, advert.centre, peer_id
                if self.distance(level, me) <= threshold * self.hysteresis:
                    continue
                lab = self._labels[level] = self._own()  # drifted out of the landmark's ball: re-elect
                changed.append(level)
                continue
            if self._rank(advert.landmark) >= lab.rank:
                continue
            core = self._core(me, advert.centre)
            if core == math.inf and chain >= threshold and len(self._unsure) < 16:
                self._unsure.add(advert.landmark)
            if min(chain, core) < threshold:
                self._labels[level] = Label(advert.landmark, advert.centre, chain, vouched, peer_id, self._rank(advert.landmark))
                if level not in changed:
                    changed.append(level)
        return changed

    def expire(self, me: Coord, now: float) -> list[int]:
        """Drop labels whose word is older than `max_age` or whose landmark is now too far.
        Returns the levels that fell back to ourselves."""
        changed = []
        for level, threshold in self.thresholds.items():
            lab = self._labels[level]
            if lab.centre is None:
                continue
            if now - lab.vouched > self.max_age or self.distance(level, me) > threshold * self.hysteresis:
                self._labels[level] = self._own()
                changed.append(level)
        return changed
