"""Routing: which servers carry a session through blocks [start, end) — apart from the session itself.

`find_route` is Dijkstra over block boundaries 0..n: an edge a → b exists for every server whose
announced span contains [a, b) (spans may be cut), weighted by

    rtt(server) + hop_overhead + (b - a) × block_time(server, load) + session_spread × load
      + (no_cache_penalty if it lacks cache) + unreliability_penalty × (1 − reliability(server))

and, with a green preference (`grid`, pipeline/grid.py), the compute term (b − a) × block_time is
stretched by 1 + w·(1 − P_grid(server)) ∈ [1, 1 + w]: the route chosen is never more than (1 + w) times
the fastest route's cost (w = 0.2 for `--prefer green`: at most 20% slower). With `--prefer cheap`
(`price`) each hop also costs `price_weight` × (b − a) × its price multiplier (the rate its receipts
would carry / 1000, pipeline/pricing.py): a second a block at 1×, so price outweighs speed and the
cheapest route wins, speed breaking ties; `fast` and `green` leave price out.

Tiers, as the client believes them (`SequenceManager.believed_tier`): a server's announced tier
multiplier, but never more than what its announced prefill throughput is worth in FLOP/s on this
model (the client prices the FLOPs itself, pipeline/flops.py `tier_flops_per_token`), nor, once the
client has seen it step, more than the tier of `OBSERVED_SLACK` × the speed it saw. What a client sees
(`observe_speed`: block-tokens per second of its steps of at least `SPEED_CHECK_TOKENS` — the size of
the start-up measurement that placed the server — the best seen) is timed by the compute time the
server reports for the step ("compute_s", which excludes the network, so an honest fast server is not
judged by its RTT), never more than the wall clock the client saw; in push mode too, where no per-hop
wall clock exists. 4× leaves room for what a step costs beyond the start-up measurement (attention over
the cached context, unpacking and signing, sharing the compute thread with other sessions) and is below
every gap between tier anchors but the workstation → datacenter one, so a server claiming a tier above
its real one is refuted after one session. A server that also understates its compute time is bounded
only by the wall clock (this client's step, or the push chain's round trip).

`load` is the sessions the server already runs and `block_time` the seconds a token of one more
session takes through one of its blocks: 1 / decode_tps alone, up to batch_size / batch throughput
when its batches fill, and its capacity shared beyond that. The load is max(what the server
announced, the sessions this client holds there now): the client knows its own exactly and at
once, so concurrent requests of one peer spread over replicas before any announcement says so,
and taking the max never counts a session twice. `session_spread` breaks the ties of servers that
batch for free: the less loaded one wins.

A server this client has never reached (`verified` says no) is a probe, not a promise: anyone can sign
an announcement of huge throughput at an address where nothing listens — or where a peer accepts
connections and never answers — so its throughput counts as the slowest announced among the
candidates and `unverified_penalty` is added, shared out over the blocks it would carry (a long
announced span saves no penalty): a server we have opened a session with wins over any number of
strangers announcing more, connected ones included. A stranger we have not even dialled (`dialled`
says no) costs `undialled_penalty` more: one we are connected to is at least a live peer.

(RTT from the DHT's estimate; Petals uses RTT/2 + 18 ms and a 10 s penalty for a full cache). Banned
servers are left out. The client's own server (`local`: its blocks run in process) costs no RTT and
no hop overhead, and wins ties: a route uses our own blocks wherever they are at least as fast.
`coverage` / `replicas` / `choose_span` / `swarm_quality` / `rebalance_span` are what `--blocks auto` uses:
replicas of the least-replicated blocks first (up to `REPLICA_TARGET`), throughput second.

`SequenceManager` is the client's view of the swarm for one model (Petals' name): it caches the
DHT's announcements for a few seconds, bans servers that fault (timeouts, broken streams, wrong
outputs — never refusals, pipeline/errors.py) with exponential backoff, and builds routes on
demand; sessions ask it for a route and report faults to it. The client's own peer id is routed to
only when the client runs its peer's blocks in process (`local_blocks`): nothing dials itself. A fault
ban is lifted as soon as an announcement says the server started after the ban (a restart).
What the client has verified of each server: `reached` (a session opened: only this is `verified`),
`contacted` (a dial succeeded, or we are connected: worth no more dials, but no proof that it serves),
`unreachable` (a first contact failed — a dial, or the open of a server never reached, which
pipeline/client.py gives a shorter timeout: left out for `unreachable_for` seconds without a ban's
strike — a dead or mute address costs a dial, not a fault). `to_probe` names the never-contacted
servers worth dialling before routing (pipeline/client.py dials them in parallel).
`held`: this client's sessions per server, counted from the moment a route is chosen (`hold`) to
the hop's close (`release`, pipeline/client.py) — the load routing adds to what servers announce.
Reliability of a server, as the client uses it: min(what it announces, what this client saw — spot
checks failed mean 0 and a permanent ban (`distrust`), each failure ban a factor 0.8 — and what the
client's ledger says: `reliability_source`, e.g. disputes in verified chains, pipeline/billing.py).
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable, Iterable

import trio

from .announce import ServerInfo, fetch_servers
from .directory import SwarmDirectory
from .grid import DEFAULT_MAX_AGE, GridPreference, preference_weight
from .flops import TIER_PREFILL_TOKENS
from .tiers import MIN_MILLI, tier_milli

log = logging.getLogger(__name__)

OBSERVED_SLACK = 4.0  # a server is believed at most the tier of 4× the speed it was seen stepping at
SPEED_CHECK_TOKENS = TIER_PREFILL_TOKENS  # steps of at least this many tokens measure a server's prefill speed


class NoRoute(RuntimeError):
    """No chain of (unbanned, online) servers covers the blocks asked for."""


@dataclass(frozen=True)
class RouteHop:
    peer_id: str
    start: int
    end: int


@dataclass
class RoutingConfig:
    default_rtt: float = 0.05  # seconds, for a server we have no estimate for
    hop_overhead: float = 0.002  # per hop on top of the RTT: fewer hops win ties
    no_cache_penalty: float = 10.0
    unreliability_penalty: float = 1.0  # seconds of route cost for a server of reliability 0
    local_discount: float = 1e-6  # our own blocks' compute time counts this fraction less: they win ties
    # seconds of route cost for carrying the whole range through servers this client has never reached,
    # charged per block (a stranger's span of blocks, like its throughput, is only a claim) ...
    unverified_penalty: float = 1.0
    undialled_penalty: float = 1.0  # ... and more for those it is not even connected to (nor dialled)
    session_spread: float = 1e-3  # seconds of route cost per session a server runs: equal servers share the load
    grid_max_age: float = DEFAULT_MAX_AGE  # seconds: an older grid signal is ignored
    price_weight: float = 1.0  # with a cheap preference: seconds of route cost per block at a 1× rate


def block_time(decode_tps: float, batch_decode_tps: float | None, batch_size: int, load: int) -> float:
    """Seconds a token of a new session takes through one block of a server already running `load`
    sessions. A batch of n ≤ batch_size steps takes from 1 / decode_tps (n = 1) to batch_size /
    capacity (full), linearly in between; past a full batch the sessions share its capacity."""
    n = load + 1
    size = batch_size if batch_decode_tps else 1
    # never more than `size` sessions each as fast as one alone: an announcement claiming it is not believed
    capacity = min(max(decode_tps, batch_decode_tps or 0.0), size * decode_tps)
    alone = 1.0 / decode_tps
    if n >= size:
        return max(alone, n / capacity)
    return alone + (n - 1) / (size - 1) * (size / capacity - alone)


def find_route(servers: Iterable[ServerInfo], start: int, end: int, *, rtt: Callable[[str], float | None] = lambda p: None,
               exclude: Iterable[str] = (), need_cache_tokens: int = 0,
               config: RoutingConfig | None = None,
               reliability: Callable[[ServerInfo], float] | None = None, local: str | None = None,
               verified: Callable[[str], bool] | None = None, dialled: Callable[[str], bool] | None = None,
               grid: GridPreference | None = None, price: Callable[[ServerInfo], float] | None = None,
               load: Callable[[ServerInfo], int] | None = None) -> list[RouteHop]:
    """Cheapest chain of hops covering [start, end) exactly; raises NoRoute naming the first gap.
    `local`: the peer whose blocks run in this process (no network between us). `verified`: whether
    this client has reached a server (None: believe every announcement); `dialled`: whether it is
    connected to it or dialled it (None: as if so). `grid`: a green preference (None: grid signals
    play no part). `price`: a cheap preference, a server's price multiplier (None: price plays no
    part; our own blocks are free). `load`: the sessions a server runs (None: as it announced)."""
    cfg = config or RoutingConfig()
    banned = set(exclude)
    usable = [s for s in servers if s.online and s.peer_id not in banned and s.start < end and s.end > start]
    slowest = min((s.decode_tps for s in usable), default=1.0)
    edges: dict[int, list[tuple[int, float, str]]] = {}
    for s in usable:
        sessions = load(s) if load is not None else s.sessions
        unknown = 0.0  # route cost per block of a server never reached
        if s.peer_id == local:
            base = 0.0
            per_block = (1.0 - cfg.local_discount) * block_time(s.decode_tps, s.batch_decode_tps, s.batch_size, sessions)
        elif verified is not None and not verified(s.peer_id):
            r = rtt(s.peer_id)
            base = (cfg.default_rtt if r is None else r) + cfg.hop_overhead
            per_block = block_time(slowest, None, 1, sessions)
            undialled = dialled is not None and not dialled(s.peer_id)
            # a share per block, not per hop: announcing a longer span buys no fewer penalties
            unknown = (cfg.unverified_penalty + (cfg.undialled_penalty if undialled else 0.0)) / (end - start)
        else:
            r = rtt(s.peer_id)
            base = (cfg.default_rtt if r is None else r) + cfg.hop_overhead
            per_block = block_time(s.decode_tps, s.batch_decode_tps, s.batch_size, sessions)
        base += cfg.session_spread * sessions
        if grid is not None:
            per_block *= grid.slowdown(s.grid)
        per_block += unknown
        if s.cache_tokens < need_cache_tokens:
            base += cfg.no_cache_penalty
        r = reliability(s) if reliability is not None else s.reliability
        base += cfg.unreliability_penalty * (1.0 - min(1.0, max(0.0, r)))
        if price is not None and s.peer_id != local:
            per_block += cfg.price_weight * price(s)
        lo, hi = max(s.start, start), min(s.end, end)
        for a in range(lo, hi):
            for b in range(a + 1, hi + 1):
                edges.setdefault(a, []).append((b, base + (b - a) * per_block, s.peer_id))
    dist = {start: 0.0}
    prev: dict[int, tuple[int, str]] = {}
    heap = [(0.0, start)]
    while heap:
        d, a = heapq.heappop(heap)
        if a == end:
            break
        if d > dist.get(a, math.inf):
            continue
        for b, w, peer in edges.get(a, ()):
            nd = d + w
            if nd < dist.get(b, math.inf) - 1e-12:
                dist[b] = nd
                prev[b] = (a, peer)
                heapq.heappush(heap, (nd, b))
    if end not in dist:
        reach = max(dist)
        raise NoRoute(f"no server (of {len(usable)} usable) serves block {reach} "
                      f"on the way through blocks [{start}, {end})")
    hops = []
    b = end
    while b != start:
        a, peer = prev[b]
        hops.append(RouteHop(peer, a, b))
        b = a
    return hops[::-1]


REPLICA_TARGET = 2  # `--blocks auto` raises every block to this many replicas before it weighs throughput


def coverage(servers: Iterable[ServerInfo], num_blocks: int, *, exclude: Iterable[str] = ()) -> list[float]:
    """Announced decode capacity per block (batched, `ServerInfo.capacity_tps`), summed over online servers."""
    banned = set(exclude)
    out = [0.0] * num_blocks
    for s in servers:
        if s.online and s.peer_id not in banned:
            for i in range(max(0, s.start), min(num_blocks, s.end)):
                out[i] += s.capacity_tps
    return out


def replicas(servers: Iterable[ServerInfo], num_blocks: int, *, exclude: Iterable[str] = ()) -> list[int]:
    """How many online servers announce each block."""
    banned = set(exclude)
    out = [0] * num_blocks
    for s in servers:
        if s.online and s.peer_id not in banned:
            for i in range(max(0, s.start), min(num_blocks, s.end)):
                out[i] += 1
    return out


def _scarcity(counts: list[int]) -> list[int]:
    """Replica counts up to the target, ascending: lexicographically smaller is scarcer."""
    return sorted(min(c, REPLICA_TARGET) for c in counts)


def choose_span(servers: Iterable[ServerInfo], num_blocks: int, k: int, *, exclude: Iterable[str] = ()) -> tuple[int, int]:
    """The window of k blocks the swarm lacks most: the fewest replicas (counted up to `REPLICA_TARGET`,
    the least-replicated blocks first), then the lowest minimum throughput, then the lowest total."""
    k = max(1, min(k, num_blocks))
    servers = list(servers)
    reps = replicas(servers, num_blocks, exclude=exclude)
    cov = coverage(servers, num_blocks, exclude=exclude)
    best = min(range(num_blocks - k + 1),
               key=lambda a: (_scarcity(reps[a:a + k]), min(cov[a:a + k]), sum(cov[a:a + k]), a))
    return best, best + k


def swarm_quality(servers: Iterable[ServerInfo], num_blocks: int) -> float:
    """min / max per-block throughput (0 when some block is uncovered, 1 when perfectly even)."""
    cov = coverage(servers, num_blocks)
    return 0.0 if not cov or max(cov) == 0 else min(cov) / max(cov)


def rebalance_span(others: list[ServerInfo], me: ServerInfo, num_blocks: int, threshold: float) -> tuple[int, int] | None:
    """Where `me` should move to, or None to stay. It moves when some block is below `REPLICA_TARGET`
    replicas or swarm quality is below `threshold`, and only to a window that leaves the swarm
    strictly better: fewer scarce blocks (all blocks' replica counts up to the target, ascending,
    compared lexicographically — so every move raises the same measure and moves cannot cycle),
    else the same counts and a higher minimum throughput."""
    now = others + [me]
    if min(replicas(now, num_blocks)) >= REPLICA_TARGET and swarm_quality(now, num_blocks) >= threshold:
        return None
    a, b = choose_span(others, num_blocks, me.end - me.start)
    if (a, b) == (me.start, me.end):
        return None
    moved = others + [replace(me, start=a, end=b)]
    before = (_scarcity(replicas(now, num_blocks)), min(coverage(now, num_blocks)))
    after = (_scarcity(replicas(moved, num_blocks)), min(coverage(moved, num_blocks)))
    return (a, b) if after > before else None


@dataclass
class _Ban:
    until: float  # trio time
    strikes: int
    since: float  # network time of the ban (announcements are stamped in it)


@dataclass
class SequenceManager:
    """The client's view of one model's swarm: announcements (cached), bans, routes."""

    dht: SwarmDirectory
    model_id: str
    num_blocks: int
    refresh_interval: float = 5.0
    ban_base: float = 15.0
    ban_max: float = 300.0
    config: RoutingConfig = field(default_factory=RoutingConfig)
    servers: list[ServerInfo] = field(default_factory=list)
    heard: dict[str, ServerInfo] = field(default_factory=dict)  # by gossip: may be newer than the DHT's
    _fetched: list[ServerInfo] = field(default_factory=list)
    _fetched_at: float = -math.inf
    _bans: dict[str, _Ban] = field(default_factory=dict)
    _lock: trio.Lock = field(default_factory=trio.Lock)
    rtts: dict[str, float] = field(default_factory=dict)  # measured by sessions (seconds)
    distrusted: dict[str, str] = field(default_factory=dict)  # peer → why (caught lying): never routed again
    checks: dict[str, list[int]] = field(default_factory=dict)  # peer → [passed, failed] spot checks
    # {peer_id: factor} from the client's ledger (ClientBilling.reliability_by_peer)
    reliability_source: Callable[[], Awaitable[dict[str, float]]] | None = None
    ledger_view: dict[str, float] = field(default_factory=dict)
    me: str | None = None  # the client's own peer id: routed to only with `local_blocks`
    local_blocks: bool = False  # the client runs its peer's own blocks in process
    unreachable_for: float = 300.0  # seconds a server whose first contact failed is left out
    reached: set[str] = field(default_factory=set)  # servers we opened a session with
    contacted: set[str] = field(default_factory=set)  # servers we dialled (or are connected to)
    unreachable: dict[str, float] = field(default_factory=dict)  # never-reached server → trio time it may be tried again
    dials_failed: int = 0  # first contacts that failed (dial or session open), over this manager's life
    speeds: dict[str, float] = field(default_factory=dict)  # peer → best block-tokens/s seen in its prompt steps
    # block → FLOPs per token of a prefill through it (the model's config); None: announced tiers are not believed
    block_flops: Callable[[int], float] | None = None
    # (peer id, dtype) → the most we pay it, in thousandths (ClientBilling.rate); None: its believed tier
    rate_of: Callable[[str, str], int] | None = None
    held: dict[str, int] = field(default_factory=dict)  # server → this client's sessions there (open or opening)

    def _avoid(self, exclude: Iterable[str]) -> set[str]:
        """Peers no route or check may use: banned, distrusted, `exclude`, and ourselves unless in process."""
        ourselves = {self.me} if self.me is not None and not self.local_blocks else set()
        now = trio.current_time()
        dead = {p for p, until in self.unreachable.items() if until > now}
        return self.banned() | set(exclude) | ourselves | dead

    async def refresh(self, force: bool = False) -> list[ServerInfo]:
        async with self._lock:
            if force or trio.current_time() - self._fetched_at > self.refresh_interval or not self.servers:
                self._fetched = await fetch_servers(self.dht, self.model_id, num_blocks=self.num_blocks,
                                                    online_only=False)
                self._fetched_at = trio.current_time()
            self._merge()  # also drops gossiped announcements past their expiry
        return self.servers

    def hear(self, info: ServerInfo) -> None:
        """An announcement that came by gossip: routes use it at once, not at the next DHT refresh."""
        known = self.heard.get(info.peer_id)
        if known is None or info.t >= known.t:
            self.heard[info.peer_id] = info
            self._merge()

    def _merge(self) -> None:
        """The servers to route over: per server the newest announcement, from the DHT or gossip."""
        now = self.dht.network.now()
        newest = {s.peer_id: s for s in self._fetched}
        for peer_id, info in list(self.heard.items()):
            if info.expires <= now:
                del self.heard[peer_id]
            elif peer_id not in newest or info.t > newest[peer_id].t:
                newest[peer_id] = info
        now_trio = trio.current_time()
        for peer_id, until in list(self.unreachable.items()):
            if until <= now_trio:
                del self.unreachable[peer_id]
        announced = {p for p, info in newest.items() if info.online}
        self.reached &= announced  # what we know of servers that are gone goes with them
        self.contacted &= announced
        for peer_id, info in newest.items():
            ban = self._bans.get(peer_id)
            if ban is not None and info.started > ban.since and ban.until > trio.current_time():
                ban.until = -math.inf  # restarted since the fault: route to it again (the strikes stay)
                log.info("server %s restarted: its ban is lifted", peer_id[-8:])
        self.servers = sorted((s for s in newest.values() if s.online), key=lambda s: (s.start, s.end, s.peer_id))

    def verified(self, peer_id: str) -> bool:
        """We reached `peer_id`: opened a session with it (a connection alone proves nothing: a Sybil
        accepts streams and never answers)."""
        return peer_id in self.reached

    def dialled(self, peer_id: str) -> bool:
        """We reached `peer_id` or a dial to it succeeded: dialling it again would tell us nothing."""
        return peer_id in self.reached or peer_id in self.contacted

    def note_reached(self, peer_id: str) -> None:
        self.reached.add(peer_id)
        self.unreachable.pop(peer_id, None)

    def note_contact(self, peer_id: str, ok: bool) -> None:
        """The outcome of a first contact (a dial, or a session open before any succeeded): a failure
        leaves the server out for `unreachable_for` seconds, with no ban."""
        if ok:
            self.contacted.add(peer_id)
            self.unreachable.pop(peer_id, None)
        else:
            self.dials_failed += 1
            self.contacted.discard(peer_id)
            self.unreachable[peer_id] = trio.current_time() + self.unreachable_for
            log.info("server %s could not be reached: left out for %.0f s", peer_id[-8:], self.unreachable_for)

    def forgive_unreachable(self, start: int, end: int) -> bool:
        """Clear the marks of servers of [start, end) whose first contact failed; whether there were any."""
        forgiven = [s.peer_id for s in self.servers if s.peer_id in self.unreachable and s.start < end and s.end > start]
        for peer_id in forgiven:
            del self.unreachable[peer_id]
        return bool(forgiven)

    def note_connected(self, peers: Iterable[str]) -> None:
        """Announced servers among `peers` (the network's open connections) count as contacted."""
        announced = {s.peer_id for s in self.servers}
        self.contacted.update(p for p in peers if p in announced)

    def to_probe(self, start: int, end: int, n: int) -> list[ServerInfo]:
        """Up to `n` never-contacted servers to dial before routing [start, end): none while every
        block there has a dialled server we may route to; else servers of the blocks that lack one,
        those our DHT has heard from first (a live peer), in random order otherwise: what an
        announcement claims (span, throughput) cannot tell an honest stranger from a Sybil."""
        avoid = self._avoid(())
        usable = [s for s in self.servers if s.online and s.peer_id not in avoid and s.start < end and s.end > start]
        covered: set[int] = set()
        for s in usable:
            if self.dialled(s.peer_id) or (self.local_blocks and s.peer_id == self.me):
                covered.update(range(max(s.start, start), min(s.end, end)))
        missing = set(range(start, end)) - covered
        if not missing:
            return []
        unknown = [s for s in usable if not self.dialled(s.peer_id) and missing.intersection(range(s.start, s.end))]
        random.shuffle(unknown)
        unknown.sort(key=lambda s: self.dht.rtt_estimate(s.peer_id) is None)
        return unknown[:n]

    def hold(self, peer_ids: Iterable[str]) -> None:
        """Count a session of ours at each of `peer_ids` (from the moment its route is chosen)."""
        for p in peer_ids:
            self.held[p] = self.held.get(p, 0) + 1

    def release(self, peer_ids: Iterable[str]) -> None:
        for p in peer_ids:
            left = self.held.get(p, 0) - 1
            if left > 0:
                self.held[p] = left
            else:
                self.held.pop(p, None)

    def load(self, info: ServerInfo) -> int:
        """Sessions `info`'s server runs, as far as we know: its announcement may be older than ours."""
        return max(info.sessions, self.held.get(info.peer_id, 0))

    def banned(self) -> set[str]:
        now = trio.current_time()
        return {p for p, b in self._bans.items() if b.until > now} | set(self.distrusted)

    def distrust(self, peer_id: str, reason: str) -> None:
        """`peer_id` was caught returning wrong outputs: leave it out of every route from now on."""
        self.distrusted[peer_id] = reason
        self.record_check(peer_id, False)
        log.warning("server %s is distrusted: %s", peer_id[-8:], reason)

    def record_check(self, peer_id: str, passed: bool) -> None:
        c = self.checks.setdefault(peer_id, [0, 0])
        c[0 if passed else 1] += 1

    def observe_speed(self, peer_id: str, tokens: int, blocks: int, compute_s: float, wall_s: float) -> None:
        """A step of `tokens` through `blocks` of `peer_id`'s took `compute_s` by the server's report and
        `wall_s` by our clock (an upper bound on its compute: a report above it, or none, counts the wall)."""
        seconds = compute_s if 0 < compute_s <= wall_s else wall_s
        if tokens >= SPEED_CHECK_TOKENS and seconds > 0:
            self.speeds[peer_id] = max(self.speeds.get(peer_id, 0.0), tokens * blocks / seconds)

    def believed_tier(self, peer_id: str) -> int:
        """The tier multiplier in thousandths we believe `peer_id` has: its announced one, at most what its
        announced prefill throughput is worth, and at most the tier of `OBSERVED_SLACK` × the speed we saw
        (the lowest when it announces none, or we cannot price FLOPs)."""
        info = self.server(peer_id)
        if info is None or info.tier_milli is None or self.block_flops is None:
            return MIN_MILLI
        per_token = self.block_flops(info.start)
        believed = min(info.tier_milli, tier_milli(info.prefill_tps * per_token))
        seen = self.speeds.get(peer_id)
        return believed if seen is None else min(believed, tier_milli(seen * OBSERVED_SLACK * per_token))

    def price(self, info: ServerInfo) -> float:
        """`info`'s price multiplier as this client would pay it at most (the rate of our receipts / 1000)."""
        if self.rate_of is not None:
            return self.rate_of(info.peer_id, info.dtype) / 1000
        return self.believed_tier(info.peer_id) / 1000

    def reliability(self, info: ServerInfo) -> float:
        """min(announced, observed here, the ledger's view) in [0, 1]."""
        p = info.peer_id
        if p in self.distrusted:
            return 0.0
        ban = self._bans.get(p)
        local = 0.8 ** ban.strikes if ban else 1.0
        return max(0.0, min(info.reliability, local, self.ledger_view.get(p, 1.0)))

    def ban(self, peer_id: str, reason: str = "") -> float:
        """Leave `peer_id` out of routes for a while (doubling with each strike); returns the seconds."""
        old = self._bans.get(peer_id)
        strikes = (old.strikes + 1) if old else 1
        seconds = min(self.ban_base * 2 ** (strikes - 1), self.ban_max)
        self._bans[peer_id] = _Ban(trio.current_time() + seconds, strikes, self.dht.network.now())
        log.info("banned server %s for %.0f s: %s", peer_id[-8:], seconds, reason)
        return seconds

    def observe_rtt(self, peer_id: str, seconds: float) -> None:
        old = self.rtts.get(peer_id)
        self.rtts[peer_id] = seconds if old is None else 0.8 * old + 0.2 * seconds

    def rtt(self, peer_id: str) -> float | None:
        est = self.dht.rtt_estimate(peer_id)
        return est if est is not None else self.rtts.get(peer_id)

    def server(self, peer_id: str) -> ServerInfo | None:
        return next((s for s in self.servers if s.peer_id == peer_id), None)

    async def route(self, start: int = 0, end: int | None = None, *, need_cache_tokens: int = 0,
                    exclude: Iterable[str] = (), prefer: str = "fast") -> list[RouteHop]:
        """The cheapest route through [start, end); `prefer` "green" weighs in the servers' grid signals,
        "cheap" their prices."""
        end = self.num_blocks if end is None else end
        weight = preference_weight(prefer)
        grid = GridPreference(weight, self.dht.network.now(), self.config.grid_max_age) if weight > 0 else None
        price = self.price if prefer == "cheap" else None
        servers = await self.refresh()
        if self.reliability_source is not None:
            try:
                self.ledger_view = await self.reliability_source()
            except Exception as e:  # noqa: BLE001 - a view, not a requirement
                log.info("could not read the ledger's reliability view: %s", e)
        local = self.me if self.local_blocks else None
        try:
            return find_route(servers, start, end, rtt=self.rtt, exclude=self._avoid(exclude),
                              need_cache_tokens=need_cache_tokens, config=self.config, reliability=self.reliability,
                              local=local, verified=self.verified, dialled=self.dialled, grid=grid, price=price,
                              load=self.load)
        except NoRoute:
            servers = await self.refresh(force=True)  # the swarm may have changed since the last read
            return find_route(servers, start, end, rtt=self.rtt, exclude=self._avoid(exclude),
                              need_cache_tokens=need_cache_tokens, config=self.config, reliability=self.reliability,
                              local=local, verified=self.verified, dialled=self.dialled, grid=grid, price=price,
                              load=self.load)

    def checkers(self, start: int, end: int, *, exclude: Iterable[str] = ()) -> list[ServerInfo]:
        """Online, trusted, unbanned servers whose span holds all of [start, end) (spot-check candidates):
        our own (in process), servers we reached or our DHT hears from, not strangers known by their
        announcement or a connection alone (a checker is opened in passing, one candidate after another:
        dead addresses would each cost a dial, mute peers a timeout)."""
        avoid = self._avoid(exclude)
        return [s for s in self.servers if s.online and s.start <= start and end <= s.end and s.peer_id not in avoid
                and (s.peer_id == self.me or self.verified(s.peer_id) or self.dht.rtt_estimate(s.peer_id) is not None)]
