"""DHTNode: the Kademlia node a peer runs — tables, handlers, lookups, stores, maintenance.

Compose it with any `p2p.network.Network` (libp2p or simulator):

    node = DHTNode(network, bootstrap=["/ip4/…/p2p/12D3KooW…"], region="eu-west")
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)          # serves /potluck/kad/1.0.0, bootstraps, maintains
        await node.store("blocks/m/12", {"span": [12, 18]}, ttl=120)
        entries = await node.get("blocks/m/12")  # {subkey: SignedValue}; entry.value is the decoded value
        node.status()                          # small dict for `potluck status` / dashboards

What it does:
- One routing table per cluster level (clusters.py): level 0 holds every server-mode peer heard
  from, level L holds only peers advertising our label at L. Tables fill from every message
  (requests carry the sender's address unless it is in client mode), from lookups, and from a
  self-lookup per level whenever the label at that level changes. Full buckets ping their
  least-recently-seen entry (unless seen in the last minute) before a newcomer may replace it.
- Lookups and stores start in the tightest cluster and continue outward, each level's walk seeded
  with where the previous one got to (Coral). A value found in an inner cluster ends the lookup
  there. Stores go to the `replicas` closest answering peers at every level.
- Records are signed by their owners (records.py); every entry that arrives — in a STORE or in a
  FIND_VALUE reply — is verified before use. What a node holds for others stays within
  `DHTConfig.store_limits`, counted per owner and per sending peer. After a read, answering peers among the closest that
  lacked an entry or held an older one are sent the newest (stale holders corrected; this also
  caches hot keys along the path).
- Owners republish their entries before expiry with a fresh signature; records expire at
  `network.now()`-based times at every holder.
- Every address a stranger gives (a reply's contacts, a message's sender address) passes
  `Network.may_dial` in `_may_dial` before it is dialled, noted in the address book, or enters a
  table or a walk; one that may not be dialled is dropped (`stats["addrs_refused"]`), the rest of
  the message is used. The operator's bootstrap addresses are dialled as given, and stand for a
  bootstrap peer whose own address may not be dialled.
- Failed peers are blacklisted with exponential backoff and dropped from tables after
  `max_failures` consecutive failures. Only peers that answered enter tables, so a fake contact
  offered in a lookup never does.
- A lookup gives up on a contact after a few expected RTTs (traversal.py): our measurement of it,
  or else its coordinate's estimate capped at the slow end of what we measure to anyone, so a liar
  cannot make us wait long for its fakes by claiming they are far away. Reads for several holders
  walk disjoint paths.
- Every reply carries the responder's Vivaldi coordinate and every request measures an RTT
  (connection setup is timed apart from the request, so samples are pure RTTs); a few pings per
  maintenance round add samples. `rtt_estimate`, `closest` and the cluster labels come from there.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

import trio

from p2p.errors import BadRequest, FrameError, P2PError, PeerUnreachable
from p2p.network import Network

from . import protocol as proto
from .clusters import DEFAULT_THRESHOLDS, Clusters, region_seed
from .ids import key_id, node_id, puzzle_ok, random_id_in_bucket
from .protocol import PROTOCOL, PeerInfo, Reply, WireContact
from .records import InvalidRecord, RecordStore, SignedValue, StoreLimits, Validators, merge
from .routing import Contact, RoutingTable
from .traversal import Candidate, LookupResult, iterative_lookup
from .vivaldi import Coord, Vivaldi

log = logging.getLogger(__name__)


class NotMember(P2PError):
    """A peer answered a cluster walk for a cluster it is not in (not counted, not blacklisted)."""


@dataclass
class DHTConfig:
    k: int = 20
    alpha: int = 3
    disjoint_paths: int = 2  # d, for lookups with secure=True
    replicas: int | None = None  # peers each store goes to per level; None = k
    request_timeout: float = 2.0
    min_soft_timeout: float = 0.15
    cluster_thresholds: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_THRESHOLDS))  # {} = plain
    select: str = "rtt"  # "rtt" = proximity route selection; "xor" = textbook
    window: int = 6  # how many closest candidates "rtt" selection chooses among
    inner_patience: int = 3  # an inner-cluster value walk gives up when this many closest lack it
    refresh_interval: float = 900.0
    join_refreshes: int = 1  # far buckets refreshed right after joining
    maintenance_interval: float = 30.0
    relabel_settle: float = 1.0  # after a label changes, wait this long before announcing it
    vivaldi_pings: int = 2  # pings per maintenance round, for RTT samples
    default_ttl: float = 3600.0
    republish_fraction: float = 0.5  # owners re-sign and re-store once this fraction of the TTL is left
    blacklist_base: float = 5.0
    blacklist_max: float = 300.0
    max_failures: int = 2
    fresh_for: float = 60.0  # a bucket's oldest entry seen this recently is not pinged before eviction
    puzzle_difficulty: int = 0
    bootstrap_retry: float = 5.0
    healthy_size: int = 1  # table size at which bootstrap counts as done (also needs a self-lookup answer)
    max_peer_states: int = 4096
    trust_vivaldi_below: float = 0.25  # Vivaldi error under which estimates may decide cluster labels
    cluster_label_max_age: float = 600.0  # a label without fresh word from its landmark for this long is dropped
    store_limits: StoreLimits = field(default_factory=StoreLimits)  # what this node stores for others
    protocol: str = PROTOCOL


@dataclass(slots=True)
class PeerState:
    coord: Coord | None = None
    labels: dict[int, str] = field(default_factory=dict)
    addr: str | None = None
    rtts: list[float] = field(default_factory=list)
    last_seen: float = -math.inf
    failures: int = 0
    banned_until: float = -math.inf

    @property
    def rtt(self) -> float | None:
        if not self.rtts:
            return None
        return sorted(self.rtts)[len(self.rtts) // 2]


@dataclass
class ValueLookup:
    """A read's result with its cost, for benchmarks and diagnostics."""

    entries: dict[str, SignedValue]
    found: bool
    level: int | None  # level whose walk found it (None: not found)
    hops: int
    messages: int
    holders: list[str]


class DHTNode:
    def __init__(self, network: Network, *, bootstrap: Iterable[str] = (), config: DHTConfig | None = None,
                 client_mode: bool = False, region: str | None = None, validators: Validators | None = None,
                 seed: int | None = None):
        self.network = network
        self.config = config or DHTConfig()
        self.client_mode = client_mode
        self.region = region
        self.bootstrap_addrs = list(bootstrap)
        self._bootstrapped: dict[str, str] = {}  # peer id → the bootstrap address the operator gave for it
        self.peer_id = network.peer_id
        self.node_id = node_id(self.peer_id)
        self.rng = random.Random(seed if seed is not None else self.node_id)
        self.vivaldi = Vivaldi(region_seed(region, self.rng), self.rng)
        self.clusters_view = Clusters(self.peer_id, self.config.cluster_thresholds, max_age=self.config.cluster_label_max_age,
                                      trust_below=self.config.trust_vivaldi_below)
        self.tables: dict[int, RoutingTable] = {lv: RoutingTable(self.node_id, self.config.k) for lv in self.clusters_view.levels}
        self.records = RecordStore(validators, self.config.store_limits)
        self.peers: dict[str, PeerState] = {}
        self.ready = trio.Event()
        self._connected: set[str] = set()
        self._nursery: trio.Nursery | None = None
        self._pinging: set[str] = set()
        self._probed: dict[str, float] = {}  # landmark → when we last measured it
        self._owned: dict[tuple[str, str], tuple[Any, float, list[int] | None, float]] = {}
        self._relabelled: set[int] = set()  # levels whose label changed since we last announced it
        self._relabel_wakeup = trio.Event()
        self._recent_rtts: deque[float] = deque(maxlen=64)  # every peer's, for expectations of unmeasured ones
        self.stats = {"requests_in": 0, "requests_out": 0, "bad_requests": 0, "bad_replies": 0, "corrections": 0,
                      "addrs_refused": 0}
        network.add_connection_listener(self._on_connection)

    # --- public surface -------------------------------------------------------------------------

    @property
    def addr(self) -> str | None:
        if self.client_mode:
            return None
        addrs = self.network.listen_addrs()
        return addrs[0] if addrs else None

    @property
    def coordinate(self) -> Coord:
        return self.vivaldi.coord

    @property
    def clusters(self) -> dict[int, str]:
        """Our cluster label (landmark peer id) per level; level 0 (global) is ""."""
        return {0: "", **self.clusters_view.labels()}

    def rtt_estimate(self, peer_id: str) -> float | None:
        """Seconds: measured (median of recent samples) if we have talked, else Vivaldi, else None."""
        ps = self.peers.get(peer_id)
        if ps is None:
            return None
        if ps.rtts:
            return ps.rtt
        if ps.coord is not None:
            return self.vivaldi.estimate(ps.coord)
        return None

    def closest(self, n: int, *, servers_only: bool = True) -> list[tuple[str, float]]:
        """Up to `n` known peers with the lowest estimated RTT: [(peer id, seconds)], nearest first."""
        now = trio.current_time()
        out = []
        for peer_id, ps in self.peers.items():
            if ps.banned_until > now or (servers_only and ps.addr is None):
                continue
            est = self.rtt_estimate(peer_id)
            if est is not None:
                out.append((peer_id, est))
        out.sort(key=lambda t: t[1])
        return out[:n]

    def status(self) -> dict:
        c = self.vivaldi.coord
        return {
            "peer_id": self.peer_id,
            "ready": self.ready.is_set(),
            "client_mode": self.client_mode,
            "table": {str(lv): len(t) for lv, t in self.tables.items()},
            "clusters": {str(lv): label for lv, label in self.clusters.items()},
            "coordinate": {"x_ms": round(c.x * 1000, 2), "y_ms": round(c.y * 1000, 2), "height_ms": round(c.h * 1000, 2), "error": round(c.error, 3)},
            "records": len(self.records),
            "owned": len(self._owned),
            "peers_known": len(self.peers),
            "banned": sum(1 for p in self.peers.values() if p.banned_until > trio.current_time()),
            **self.stats,
        }

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve the protocol and keep the tables healthy until cancelled. `started` fires after the
        first bootstrap attempt (whatever its outcome; `ready` is set once the table is healthy)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.network.set_request_handler(self.config.protocol, self._handle)
            nursery.start_soon(self._announce_relabels)
            try:
                ok = await self._bootstrap_once()
                task_status.started(self)
                delay = self.config.bootstrap_retry
                while not ok:
                    await trio.sleep(delay * (0.5 + self.rng.random()))
                    delay = min(delay * 2, 120.0)
                    ok = await self._bootstrap_once()
                await self._maintain()
            finally:
                self._nursery = None

    async def store(self, key: str, value: Any, *, ttl: float | None = None, suffix: str = "",
                    levels: list[int] | None = None, republish: bool = True) -> int:
        """Sign `value` under our subkey (peer id, or peer id/suffix) and store it at the closest peers
        of every cluster level. Returns how many peers accepted it (0: it is stored nowhere)."""
        ttl = self.config.default_ttl if ttl is None else ttl
        entry = SignedValue.create(self.network.identity, key, value, self.network.now() + ttl, suffix)
        if republish:
            self._owned[(key, entry.subkey)] = (value, ttl, levels, entry.expires)
        return await self.store_entries(key, [entry], levels=levels)

    async def store_entries(self, key: str, entries: list[SignedValue], *, levels: list[int] | None = None) -> int:
        """Store already-signed entries (ours or anyone's) at the closest peers of each level."""
        for e in entries:
            self.records.validators.check(e, self.network.now())
        target = key_id(key)
        acks = 0
        carry: list[Candidate] = []
        replicas = self.config.replicas or self.config.k
        for level in self._levels(levels):
            result = await self._walk(target, level, carry, self._find_node_query(target, level))
            targets = result.closest[:replicas]
            if self._self_among(target, targets, replicas):
                acks += sum(self._store_local(e) for e in entries)
            ok = [0]

            async def put(contact: Contact) -> None:
                try:
                    reply = await self._rpc(contact.peer_id, contact.addr, "store", {"k": key, "e": [e.wire() for e in entries]}, key)
                except P2PError:
                    return
                if reply.stored and all(reply.stored):
                    ok[0] += 1

            async with trio.open_nursery() as nursery:
                for contact in targets:
                    nursery.start_soon(put, contact)
            acks += ok[0]
            carry = result.candidates
        return acks

    async def get(self, key: str, *, quorum: int = 1, secure: bool = False, exhaustive: bool = False,
                  levels: list[int] | None = None) -> dict[str, SignedValue]:
        """The record under `key`: {subkey: SignedValue}, newest entry per subkey, all verified.

        Coral semantics by default: the walk starts in our tightest cluster and returns from the
        first level where `quorum` holders answered — the nearest copies, which for a multi-owner
        record are the entries of owners that stored in our clusters (plus any that reached the
        global level through the same holders). `exhaustive=True` walks every level out to the
        global one and merges all entries (every owner's, wherever it is). `secure`: d disjoint
        paths and d holders (for values that matter). A read that asks for `quorum` > 1 holders
        (announcement reads do) walks min(quorum, d) disjoint paths even without `secure`: holders
        found through one liar's answers would not be independent."""
        return (await self.lookup_value(key, quorum=quorum, secure=secure, exhaustive=exhaustive, levels=levels)).entries

    async def lookup_value(self, key: str, *, quorum: int = 1, secure: bool = False, levels: list[int] | None = None,
                           select: str | None = None, use_local: bool = True, exhaustive: bool = False) -> ValueLookup:
        """`get` with its cost: hops, messages, the level that found it. `levels=[0], select="xor"`
        is textbook Kademlia (the benchmark's baseline); `use_local=False` ignores our own store
        (so a benchmark measures the network, not a replica we happen to hold)."""
        now = self.network.now()
        target = key_id(key)
        if secure:
            paths = self.config.disjoint_paths
            quorum = max(quorum, paths)
        else:
            paths = max(1, min(quorum, self.config.disjoint_paths))
        answers: dict[str, dict[str, SignedValue]] = {}
        local = self.records.get(key, now) if use_local else {}
        holders = ["self"] if local else []
        messages = hops = 0
        found_level = None
        carry: list[Candidate] = []
        result: LookupResult | None = None
        if local and quorum <= 1 and not exhaustive:
            return ValueLookup(local, True, None, 0, 0, holders)
        for level in self._levels(levels):
            # exhaustive reads never stop inside a cluster: level 0 decides
            enough = quorum if level == 0 or not exhaustive else 1 << 30
            query = self._find_value_query(key, target, level, answers, [], enough, holders)
            need = self.config.k if level == 0 else self.config.inner_patience
            result = await self._walk(target, level, carry, query, need=need, paths=paths, select=select, patient=False)
            messages += result.messages
            hops += result.hops
            if result.stopped:
                found_level = level
                break
            carry = result.candidates
        merged = merge(self.records.validators, local, *answers.values())
        if result is not None and merged:
            self._correct_stale(key, merged, answers, result.closest[: self.config.replicas or self.config.k])
        if found_level is None and merged:
            found_level = 0
        return ValueLookup(merged, bool(merged), found_level, hops, messages, holders)

    async def find_peer(self, peer_id: str) -> str | None:
        """The address of `peer_id`, from our tables or by a lookup of its id; None if not found."""
        ps = self.peers.get(peer_id)
        if ps is not None and ps.addr is not None:
            return ps.addr
        target = node_id(peer_id)
        found: list[str] = []

        async def query(contact: Contact):
            if contact.peer_id == peer_id:
                found.append(contact.addr)
                return [], True
            reply = await self._rpc(contact.peer_id, contact.addr, "find_node",
                                    {"t": proto.target_bytes(target), "lv": 0, "cl": ""})
            pairs = self._contacts(reply.contacts)
            for c, _ in pairs:
                if c.peer_id == peer_id:
                    found.append(c.addr)
                    return pairs, True
            return pairs, False

        await self._walk(target, 0, [], query)
        return found[0] if found else None

    async def find_closest(self, target: int, level: int = 0) -> list[Contact]:
        """The k closest answering peers to `target` at `level` (a FIND_NODE walk)."""
        result = await self._walk(target, level, [], self._find_node_query(target, level))
        return result.closest

    async def _refresh(self, target: int, level: int) -> None:
        """Fill the bucket `target` falls in: a walk that stops once the few closest answered
        (their replies already list up to k peers around the target)."""
        await self._walk(target, level, [], self._find_node_query(target, level), need=self.config.alpha)

    async def bootstrap(self, addrs: Iterable[str] | None = None) -> bool:
        if addrs is not None:
            self.bootstrap_addrs = list(addrs)
        return await self._bootstrap_once()

    # --- peers, tables, clusters -----------------------------------------------------------------

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        if connected:
            self._connected.add(peer_id)
        else:
            self._connected.discard(peer_id)

    def _state(self, peer_id: str) -> PeerState:
        ps = self.peers.get(peer_id)
        if ps is None:
            if len(self.peers) >= self.config.max_peer_states:
                self._evict_states()
            ps = self.peers[peer_id] = PeerState()
        return ps

    def _evict_states(self) -> None:
        in_tables = {c.peer_id for t in self.tables.values() for c in t.contacts()}
        victims = sorted((ps.last_seen, pid) for pid, ps in self.peers.items() if pid not in in_tables)
        for _, pid in victims[: len(self.peers) // 4]:
            del self.peers[pid]

    def _banned(self, peer_id: str) -> bool:
        ps = self.peers.get(peer_id)
        return ps is not None and ps.banned_until > trio.current_time()

    def _accept(self, contact: Contact) -> bool:
        if contact.peer_id == self.peer_id:
            return False
        ps = self.peers.get(contact.peer_id)
        if ps is not None and ps.failures and ps.banned_until > trio.current_time():
            return False
        return not self.config.puzzle_difficulty or puzzle_ok(contact.peer_id, self.config.puzzle_difficulty)

    def _may_dial(self, peer_id: str, addr: str) -> bool:
        """Whether an address a stranger gave for `peer_id` may be dialled, noted, or passed on
        (`Network.may_dial`: a stranger must not aim us at this host, its link, or a private network
        we are not in). Every contact of a reply and every sender address passes here."""
        if self.network.may_dial(addr):
            return True
        self.stats["addrs_refused"] += 1
        log.debug("not dialling %s for %s", addr[:200], peer_id)
        return False

    def _observe(self, peer_id: str, info: PeerInfo, rtt: float | None) -> None:
        """Fold what a message told us about its sender into states, Vivaldi, clusters and tables."""
        now = trio.current_time()
        if not puzzle_ok(peer_id, self.config.puzzle_difficulty):
            return
        ps = self._state(peer_id)
        ps.coord = info.coord
        ps.labels = {lv: advert.landmark for lv, advert in info.labels.items()}
        ps.last_seen = now
        addr = info.addr
        if addr is not None and not self._may_dial(peer_id, addr):
            addr = self._bootstrapped.get(peer_id)
        if addr is not None:
            ps.addr = addr
            self.network.add_address(peer_id, addr)
        changed: list[int] = []
        if rtt is not None:
            ps.failures = 0
            ps.rtts.append(rtt)
            if len(ps.rtts) > 5:
                del ps.rtts[0]
            self._recent_rtts.append(rtt)
            self.vivaldi.observe(peer_id, info.coord, rtt)
        view = self.clusters_view
        if view.thresholds and info.labels:
            # measured RTT, or Vivaldi's estimate once both coordinates are confident: an early,
            # unconverged estimate must not seed a label
            if ps.rtts:
                est = ps.rtt
            elif view.trusted(self.vivaldi.coord) and view.trusted(info.coord):
                est = self.vivaldi.estimate(info.coord)
            else:
                est = None
            changed = view.heard(peer_id, info.labels, est, self.vivaldi.coord, now)
            for landmark in view.take_unsure():
                self._probe_landmark(landmark)
        for level in changed:
            self._relabel(level)
        if ps.addr is not None:
            contact = Contact(peer_id, ps.addr)
            for level, table in self.tables.items():
                if level == 0 or ps.labels.get(level) == view.label(level):
                    old = table.add(contact, now)
                    if old is not None:
                        self._check_oldest(old)

    def _check_oldest(self, old: Contact) -> None:
        """A full bucket offered `old` for eviction: ping it, unless it was heard from lately."""
        ps = self.peers.get(old.peer_id)
        now = trio.current_time()
        if ps is not None and now - ps.last_seen < self.config.fresh_for:
            return
        if old.peer_id in self._pinging or self._nursery is None:
            return
        self._pinging.add(old.peer_id)
        self._nursery.start_soon(self._ping_oldest, old)

    def _probe_landmark(self, landmark: str) -> None:
        """Measure the RTT to a landmark (at most once a minute each): its reply's label then decides."""
        now = trio.current_time()
        if self._nursery is None or landmark in self._pinging or now - self._probed.get(landmark, -math.inf) < 60.0:
            return
        if len(self._probed) > 1024:
            self._probed.clear()
        self._probed[landmark] = now
        self._pinging.add(landmark)
        self._nursery.start_soon(self._ping_landmark, landmark)

    async def _ping_landmark(self, landmark: str) -> None:
        try:
            ps = self.peers.get(landmark)
            addr = ps.addr if ps is not None and ps.addr else self.network.address_of(landmark)
            if addr is None:
                addr = await self.find_peer(landmark)
            if addr is not None:
                await self._rpc(landmark, addr, "ping", {})
        except P2PError as e:
            log.debug("landmark %s: %s", landmark, e)
        finally:
            self._pinging.discard(landmark)

    async def _ping_oldest(self, old: Contact) -> None:
        try:
            await self._rpc(old.peer_id, old.addr, "ping", {})
            for table in self.tables.values():
                table.touch(old.peer_id, trio.current_time())
        except P2PError:
            for table in self.tables.values():
                table.remove(old.peer_id)
        finally:
            self._pinging.discard(old.peer_id)

    def _relabel(self, level: int) -> None:
        """Our label at `level` changed: rebuild that table from peers that share the new label."""
        label = self.clusters_view.label(level)
        table = RoutingTable(self.node_id, self.config.k)
        now = trio.current_time()
        for peer_id, ps in self.peers.items():
            if ps.addr is not None and ps.labels.get(level) == label and not self._banned(peer_id):
                table.add(Contact(peer_id, ps.addr), now)
        self.tables[level] = table
        self._relabelled.add(level)
        self._relabel_wakeup.set()

    def _failed(self, peer_id: str) -> None:
        ps = self._state(peer_id)
        ps.failures += 1
        ps.banned_until = trio.current_time() + min(self.config.blacklist_base * 2 ** (ps.failures - 1), self.config.blacklist_max)
        if ps.failures >= self.config.max_failures:
            for table in self.tables.values():
                table.remove(peer_id)

    def _levels(self, levels: list[int] | None) -> list[int]:
        if levels is None:
            return self.clusters_view.levels
        return [lv for lv in sorted(set(levels), reverse=True) if lv in self.tables]

    def _self_among(self, target: int, closest: list[Contact], n: int) -> bool:
        if self.client_mode:
            return False
        if len(closest) < n:
            return True
        return (self.node_id ^ target) < (closest[n - 1].id ^ target)

    def _store_local(self, entry: SignedValue) -> int:
        try:
            self.records.put(entry, self.network.now())
            return 1
        except InvalidRecord:
            return 0

    # --- requests we send ------------------------------------------------------------------------

    def _info(self) -> dict:
        own = self.vivaldi.coord
        return proto.encode_info(own, self.clusters_view.wire(own, trio.current_time()), self.addr)

    async def _rpc(self, peer_id: str, addr: str | None, op: str, fields: dict, key: str = "") -> Reply:
        """One request with its RTT measured apart from connection setup; failures blacklist."""
        timeout = self.config.request_timeout
        start = trio.current_time()
        deadline = start + timeout
        self.stats["requests_out"] += 1
        try:
            if addr is not None:
                self.network.add_address(peer_id, addr)
            if peer_id not in self._connected:
                addr = addr or self.network.address_of(peer_id)
                if addr is None:
                    raise PeerUnreachable(f"no address for {peer_id}")
                await self.network.connect(addr, timeout=timeout)
            sent = trio.current_time()
            body = await self.network.request(peer_id, self.config.protocol, {"op": op, "i": self._info(), **fields},
                                              timeout=max(deadline - sent, 0.01))
            rtt = trio.current_time() - sent
            try:
                reply = proto.decode_reply(op, peer_id, body, key)
            except FrameError:
                self.stats["bad_replies"] += 1
                raise
        except P2PError:
            self._failed(peer_id)
            raise
        self._observe(peer_id, reply.info, rtt)
        return reply

    def _contacts(self, wire: list[WireContact]) -> list[tuple[Contact, Coord | None]]:
        out = []
        for wc in wire:
            if wc.peer_id == self.peer_id or not self._may_dial(wc.peer_id, wc.addr):
                continue
            ps = self.peers.get(wc.peer_id)
            coord = ps.coord if ps is not None and ps.coord is not None else wc.coord
            out.append((Contact(wc.peer_id, wc.addr), coord))
        return out

    def _find_node_query(self, target: int, level: int):
        label = self.clusters_view.label(level)
        fields = {"t": proto.target_bytes(target), "lv": level, "cl": label}

        async def query(contact: Contact):
            reply = await self._rpc(contact.peer_id, contact.addr, "find_node", fields)
            if level and reply.info.landmark(level) != label:
                raise NotMember(contact.peer_id)
            return self._contacts(reply.contacts), False

        return query

    def _find_value_query(self, key: str, target: int, level: int, answers: dict, holders: list, quorum: int,
                          all_holders: list):
        label = self.clusters_view.label(level)
        fields = {"k": key, "lv": level, "cl": label}

        async def query(contact: Contact):
            reply = await self._rpc(contact.peer_id, contact.addr, "find_value", fields, key)
            now = self.network.now()
            good: dict[str, SignedValue] = {}
            for e in reply.entries:
                try:
                    self.records.validators.check(e, now)
                except InvalidRecord:
                    self.stats["bad_replies"] += 1
                    continue
                current = good.get(e.subkey)
                good[e.subkey] = e if current is None else self.records.validators.select(current, e)
            answers[contact.peer_id] = good
            if good:
                holders.append(contact.peer_id)
                all_holders.append(contact.peer_id)
            member = not level or reply.info.landmark(level) == label
            if not member and not good:
                raise NotMember(contact.peer_id)
            return self._contacts(reply.contacts) if member else [], len(holders) >= quorum

        return query

    def _rtt_for(self, peer_id: str, coord: Coord | None) -> float:
        est = self.rtt_estimate(peer_id)
        if est is None and coord is not None:
            est = self.vivaldi.estimate(coord)
        return 0.25 if est is None else est

    def _typical_rtt(self) -> float:
        """The slow end (90th percentile) of our recent RTT samples, all peers together."""
        if not self._recent_rtts:
            return 0.25
        ordered = sorted(self._recent_rtts)
        return ordered[int(0.9 * (len(ordered) - 1))]

    def _soft_timeout(self, peer_id: str, coord: Coord | None) -> float:
        """A few expected RTTs. Only our own measurements of this peer count as they are: an
        estimate from a coordinate, which whoever offered the contact may have made up far away to
        make us wait, counts at most as the slow end of what we measure to anyone."""
        est = self._rtt_for(peer_id, coord)
        ps = self.peers.get(peer_id)
        if ps is None or not ps.rtts:
            est = min(est, self._typical_rtt())
        if peer_id not in self._connected:
            est *= 2  # a dial first
        return min(max(2.0 * est + 0.05, self.config.min_soft_timeout), self.config.request_timeout)

    async def _walk(self, target: int, level: int, carry: list[Candidate], query, *, need: int | None = None,
                    paths: int = 1, select: str | None = None, patient: bool = True) -> LookupResult:
        table = self.tables[level]
        seeds: list[Any] = []
        for contact in table.nearest(target, self.config.k, exclude=lambda c: self._banned(c.peer_id)):
            ps = self.peers.get(contact.peer_id)
            seeds.append((contact, ps.coord if ps else None))
        seeds += [(c.contact, c.coord) for c in carry[: self.config.k]]
        return await iterative_lookup(
            target, seeds, query, k=self.config.k, alpha=self.config.alpha, paths=paths, need=need,
            select=select or self.config.select, window=self.config.window, rtt=self._rtt_for,
            soft_timeout=self._soft_timeout, accept=self._accept, patient=patient)

    def _correct_stale(self, key: str, merged: dict[str, SignedValue], answers: dict[str, dict[str, SignedValue]],
                       closest: list[Contact]) -> None:
        if self._nursery is None:
            return
        for contact in closest:
            had = answers.get(contact.peer_id)
            if had is None:
                continue
            missing = [e for s, e in merged.items() if had.get(s) != e]
            if missing:
                self.stats["corrections"] += 1
                self._nursery.start_soon(self._send_store, contact, key, missing)

    async def _send_store(self, contact: Contact, key: str, entries: list[SignedValue]) -> None:
        try:
            await self._rpc(contact.peer_id, contact.addr, "store", {"k": key, "e": [e.wire() for e in entries[: proto.MAX_ENTRIES]]}, key)
        except P2PError:
            pass

    # --- requests we answer ----------------------------------------------------------------------

    async def _handle(self, sender: str, body: Any) -> Any:
        self.stats["requests_in"] += 1
        try:
            req = proto.decode_request(sender, body)
        except FrameError as e:
            self.stats["bad_requests"] += 1
            raise BadRequest(str(e)) from None
        self._observe(sender, req.info, None)
        out: dict[str, Any] = {"i": self._info()}
        if req.op == "find_node":
            out["n"] = self._contacts_for(req.target, req.level, req.cluster, sender)
        elif req.op == "find_value":
            entries = self.records.get(req.key, self.network.now())
            out["e"] = [e.wire() for e in list(entries.values())[: proto.MAX_ENTRIES]]
            out["n"] = self._contacts_for(key_id(req.key), req.level, req.cluster, sender)
        elif req.op == "store":
            now = self.network.now()
            ok = []
            for entry in req.entries:
                try:
                    self.records.put(entry, now, sender)
                    ok.append(True)
                except InvalidRecord:
                    ok.append(False)
            out["ok"] = ok
        return out

    def _contacts_for(self, target: int, level: int, cluster: str, sender: str) -> list:
        table = self.tables.get(level)
        if table is None or (level and cluster != self.clusters_view.label(level)):
            return []
        out = []
        for c in table.nearest(target, self.config.k, exclude=lambda c: c.peer_id == sender):
            ps = self.peers.get(c.peer_id)
            out.append(proto.encode_contact(c.peer_id, c.addr, ps.coord if ps else None))
        return out

    # --- bootstrap and maintenance ---------------------------------------------------------------

    async def _bootstrap_once(self) -> bool:
        """Ping the bootstrap peers, look ourselves up, refresh a few far buckets, then look
        ourselves up in each cluster. True when the table is healthy (or we are the first peer)."""
        reached = 0
        for addr in self.bootstrap_addrs:
            try:
                peer_id = await self.network.connect(addr, timeout=self.config.request_timeout)
                if peer_id == self.peer_id:
                    continue
                self._bootstrapped[peer_id] = addr
                await self._rpc(peer_id, addr, "ping", {})
                reached += 1
            except P2PError as e:
                log.debug("bootstrap peer %s: %s", addr, e)
        if not self.bootstrap_addrs and len(self.tables[0]) == 0:
            self.ready.set()
            return True
        if len(self.tables[0]) == 0:
            return False
        result = await self.find_closest(self.node_id, 0)
        for index in self._far_buckets(self.config.join_refreshes):
            await self._refresh(random_id_in_bucket(self.node_id, index, self.rng), 0)
        await self._self_lookups()
        healthy = bool(result) and len(self.tables[0]) >= min(self.config.healthy_size, self.config.k)
        if healthy:
            self.ready.set()
        return healthy

    def _far_buckets(self, n: int) -> list[int]:
        table = self.tables[0]
        sizes = table.bucket_sizes()
        if not sizes:
            return []
        lowest = min(sizes)
        candidates = list(range(lowest + 1, 256))
        # the far buckets hold most of the network; refresh the ones we know least about
        candidates.sort(key=lambda i: sizes.get(i, 0))
        picked = [i for i in candidates if i >= 256 - 24][:n]
        return picked

    async def _self_lookups(self) -> None:
        for level in self.clusters_view.levels:
            if level == 0:
                continue
            if len(self.tables[level]):
                await self._refresh(self.node_id, level)

    async def _announce_relabels(self) -> None:
        """Soon after our label at a level changes, walk to ourselves in the new cluster: our reply
        carries the new label, so the members we meet add us now rather than whenever they next
        hear from us (which may be a maintenance round or more away)."""
        while True:
            await self._relabel_wakeup.wait()
            await trio.sleep(self.config.relabel_settle)  # labels change in bursts while they settle
            self._relabel_wakeup = trio.Event()
            levels, self._relabelled = sorted(self._relabelled), set()
            for level in levels:
                if level in self.tables and len(self.tables[level]):
                    try:
                        await self._refresh(self.node_id, level)
                    except P2PError as e:
                        log.debug("announcing level %d: %s", level, e)

    async def _maintain(self) -> None:
        cfg = self.config
        while True:
            await trio.sleep(cfg.maintenance_interval * (0.75 + 0.5 * self.rng.random()))
            try:
                await self._maintenance_round()
            except P2PError as e:  # individual failures are handled; never let one stop maintenance
                log.debug("maintenance: %s", e)

    async def _maintenance_round(self) -> None:
        cfg = self.config
        now = trio.current_time()
        # RTT samples for Vivaldi: ping a few random table contacts
        # (half at random for a globally consistent embedding, half among the nearest peers, which
        # sharpens local estimates and spreads cluster labels within the cluster)
        contacts = self.tables[0].contacts()
        picks = self.rng.sample(contacts, min((cfg.vivaldi_pings + 1) // 2, len(contacts)))
        near = [Contact(pid, addr) for pid, _ in self.closest(8) if (addr := self.peers[pid].addr) is not None]
        if near:
            picks += self.rng.sample(near, min(cfg.vivaldi_pings // 2, len(near)))
        # and the peers our cluster labels came through (the landmarks themselves once the word
        # gets old), to keep each label fresh and our distance to its landmark honest
        for peer_id in self.clusters_view.parents():
            ps = self.peers.get(peer_id)
            if ps is not None and ps.addr:
                picks.append(Contact(peer_id, ps.addr))
        for landmark in self.clusters_view.aging(now):
            self._probe_landmark(landmark)
        for contact in {c.peer_id: c for c in picks}.values():
            try:
                await self._rpc(contact.peer_id, contact.addr, "ping", {})
            except P2PError:
                pass
        for level in self.clusters_view.expire(self.vivaldi.coord, trio.current_time()):
            self._relabel(level)
        # a self-lookup in each cluster keeps its members' tables holding us
        await self._self_lookups()
        # bucket refresh, a couple per round
        for level, table in list(self.tables.items()):
            for index in table.stale_buckets(now, cfg.refresh_interval)[:2]:
                table.bucket(index).last_touched = now
                await self._refresh(random_id_in_bucket(self.node_id, index, self.rng), level)
        # republish what we own before it expires
        wall = self.network.now()
        for (key, subkey), (value, ttl, levels, expires) in list(self._owned.items()):
            if expires - wall <= ttl * cfg.republish_fraction:
                suffix = subkey.split("/", 1)[1] if "/" in subkey else ""
                await self.store(key, value, ttl=ttl, suffix=suffix, levels=levels)
        self.records.prune(wall)
