"""α-parallel iterative lookups, optionally over d disjoint paths.

`iterative_lookup` walks towards a target id: keep a shortlist of candidates sorted by XOR
distance, keep α queries in flight, add the contacts each reply brings, and stop when the k closest
live candidates have all answered (or when the caller's `query` says it found what it wanted).

Robustness:
- A query that has not answered within its soft timeout (a few estimated RTTs) stops counting
  against α, so a silent or slow peer delays the walk by one soft timeout, not a hard one; its
  answer is still used if it arrives before the hard timeout (enforced by `query`).
- Failed peers are reported to `on_failure` (the node blacklists them with backoff) and never
  counted among the closest; `accept` drops contacts the node refuses (invalid, blacklisted,
  puzzle not solved, ourselves).
- Replies can bring at most MAX_CONTACTS contacts each, and the shortlist is trimmed to a bounded
  size, so a peer that answers with floods of far-away or fake contacts wastes nothing but the
  slots it fills: fake contacts fail fast or time out softly, far ones sort to the back.
- Disjoint paths (S/Kademlia): with `paths=d` the seeds are dealt round-robin to d walks that share
  a claim table, so no peer is queried by two walks; one adversary on one path cannot steer the
  others. Results are merged.

Selection: "xor" is textbook Kademlia (query the closest unqueried candidate). "rtt" is proximity
route selection: among the `window` closest live candidates, query the one with the lowest
estimated RTT — every one of them makes roughly the same XOR progress, but a nearby one answers
sooner; near the end of a value lookup, where all k closest hold replicas, it picks the nearest
replica.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Iterable

import trio

from p2p.errors import P2PError

from .routing import Contact
from .vivaldi import Coord

NEW, INFLIGHT, DONE, FAILED = 0, 1, 2, 3

QueryAnswer = tuple[list[tuple[Contact, Coord | None]], bool]
QueryFn = Callable[[Contact], Awaitable[QueryAnswer]]
"""`query(contact) -> (contacts with coordinate hints, stop)`; raises P2PError on failure."""


@dataclass(slots=True)
class Candidate:
    contact: Contact
    dist: int
    depth: int
    coord: Coord | None = None
    state: int = NEW
    slow: bool = False
    soft_deadline: float = 0.0


@dataclass
class LookupResult:
    closest: list[Contact]  # peers that answered, closest first, at most k
    candidates: list[Candidate]  # every live candidate, closest first (to continue a walk elsewhere)
    messages: int = 0
    hops: int = 0  # depth of the reply that stopped the walk, or of the closest answer
    stopped: bool = False  # `query` asked to stop (e.g. the value was found)
    failed: list[str] = field(default_factory=list)


class _Walk:
    def __init__(self, lookup: "_Lookup", index: int):
        self.lookup = lookup
        self.index = index
        self.cands: dict[str, Candidate] = {}
        self.sorted: list[Candidate] = []
        self.dirty = False
        self.stop_depth = 0

    def add(self, contact: Contact, depth: int, coord: Coord | None) -> None:
        lk = self.lookup
        c = self.cands.get(contact.peer_id)
        if c is not None:
            if depth < c.depth:
                c.depth = depth
            if c.coord is None and coord is not None:
                c.coord = coord
            return
        owner = lk.claimed.get(contact.peer_id)
        if owner is not None and owner != self.index:
            return
        self.cands[contact.peer_id] = Candidate(contact, contact.id ^ lk.target, depth, coord)
        self.dirty = True

    def ordered(self) -> list[Candidate]:
        if self.dirty:
            live = sorted((c for c in self.cands.values() if c.state != FAILED), key=lambda c: c.dist)
            limit = self.lookup.max_candidates
            if len(live) > limit:  # forget far, never-queried candidates
                for c in live[limit:]:
                    if c.state == NEW:
                        del self.cands[c.contact.peer_id]
                live = [c for c in live[:limit]] + [c for c in live[limit:] if c.state != NEW]
                live.sort(key=lambda c: c.dist)
            self.sorted = live
            self.dirty = False
        return self.sorted

    def mine(self) -> list[Candidate]:
        """Live candidates this walk may ask (not claimed by another disjoint walk), closest first."""
        claimed, me = self.lookup.claimed, self.index
        return [c for c in self.ordered() if claimed.get(c.contact.peer_id, me) == me]

    def finished(self) -> bool:
        """The `need` closest live candidates have all answered (or nothing is left to ask)."""
        need = self.lookup.need
        live = [c for c in self.mine() if c.state != FAILED]
        top = live[:need]
        if top and all(c.state == DONE for c in top):
            return True
        return not any(c.state in (NEW, INFLIGHT) for c in live)

    def pick(self) -> Candidate | None:
        lk = self.lookup
        live = self.mine()
        if lk.select == "xor":
            window = live[: max(lk.k, lk.alpha)]
            for c in window:
                if c.state == NEW and lk.claimed.get(c.contact.peer_id, self.index) == self.index:
                    return c
            return None
        best, best_rtt = None, math.inf
        for c in live[: lk.window]:
            if c.state != NEW or lk.claimed.get(c.contact.peer_id, self.index) != self.index:
                continue
            rtt = lk.rtt(c.contact.peer_id, c.coord)
            if rtt < best_rtt:
                best, best_rtt = c, rtt
        if best is None:  # nothing new in the window: the walk goes on with the closest beyond it
            for c in live[lk.window : max(lk.k, lk.alpha)]:
                if c.state == NEW and lk.claimed.get(c.contact.peer_id, self.index) == self.index:
                    return c
        return best

    async def run(self) -> None:
        lk = self.lookup
        send, recv = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            active = 0
            while not lk.stop:
                while active < lk.alpha:
                    c = self.pick()
                    if c is None:
                        break
                    lk.claimed[c.contact.peer_id] = self.index
                    c.state = INFLIGHT
                    c.soft_deadline = trio.current_time() + lk.soft_timeout(c.contact.peer_id, c.coord)
                    active += 1
                    lk.messages += 1
                    nursery.start_soon(self._ask, c, send)
                if self.finished():
                    break
                if not any(c.state == INFLIGHT for c in self.cands.values()):
                    break  # nothing to ask and nothing to wait for
                inflight = [c for c in self.cands.values() if c.state == INFLIGHT and not c.slow]
                deadline = min((c.soft_deadline for c in inflight), default=math.inf)
                with trio.move_on_at(deadline):
                    c, result = await recv.receive()
                    if not c.slow:
                        active -= 1
                    self._settle(c, result)
                    continue
                now = trio.current_time()
                for c in inflight:
                    if c.soft_deadline <= now:
                        c.slow = True
                        active -= 1
            nursery.cancel_scope.cancel()

    async def _ask(self, c: Candidate, send: trio.MemorySendChannel) -> None:
        try:
            result: QueryAnswer | P2PError = await self.lookup.query(c.contact)
        except P2PError as e:
            result = e
        send.send_nowait((c, result))

    def _settle(self, c: Candidate, result: QueryAnswer | P2PError) -> None:
        lk = self.lookup
        self.dirty = True
        if isinstance(result, BaseException):
            c.state = FAILED
            lk.failed.append(c.contact.peer_id)
            return
        c.state = DONE
        contacts, stop = result
        for contact, coord in contacts:
            if lk.accept(contact):
                self.add(contact, c.depth + 1, coord)
        if stop:
            lk.stop = True
            self.stop_depth = c.depth
            if lk.on_stop is not None:
                lk.on_stop()


class _Lookup:
    def __init__(self, target: int, query: QueryFn, *, k: int, alpha: int, need: int, select: str, window: int,
                 rtt: Callable[[str, Coord | None], float], soft_timeout: Callable[[str, Coord | None], float],
                 accept: Callable[[Contact], bool], max_candidates: int):
        self.target = target
        self.query = query
        self.k = k
        self.alpha = alpha
        self.need = need
        self.select = select
        self.window = window
        self.rtt = rtt
        self.soft_timeout = soft_timeout
        self.accept = accept
        self.max_candidates = max_candidates
        self.claimed: dict[str, int] = {}
        self.messages = 0
        self.failed: list[str] = []
        self.stop = False
        self.on_stop: Callable[[], None] | None = None


async def iterative_lookup(
    target: int,
    seeds: Iterable[tuple[Contact, Coord | None]] | Iterable[Candidate],
    query: QueryFn,
    *,
    k: int = 20,
    alpha: int = 3,
    paths: int = 1,
    need: int | None = None,
    select: str = "xor",
    window: int | None = None,
    rtt: Callable[[str, Coord | None], float] = lambda peer_id, coord: 0.2,
    soft_timeout: Callable[[str, Coord | None], float] = lambda peer_id, coord: 1.0,
    accept: Callable[[Contact], bool] = lambda contact: True,
) -> LookupResult:
    """Walk towards `target` from `seeds` (pairs of contact + coordinate hint, or candidates of an
    earlier walk, whose depth carries over). `need`: how many of the closest must have answered for
    the walk to end (default k; smaller = give up sooner on a value that is not there)."""
    if select not in ("xor", "rtt"):
        raise ValueError("select is 'xor' or 'rtt'")
    lk = _Lookup(target, query, k=k, alpha=alpha, need=need or k, select=select, window=window or alpha * 2,
                 rtt=rtt, soft_timeout=soft_timeout, accept=accept, max_candidates=max(3 * k, 30))
    walks = [_Walk(lk, i) for i in range(max(1, paths))]
    seen: set[str] = set()
    n = 0
    for seed in seeds:
        if isinstance(seed, Candidate):
            contact, coord, depth = seed.contact, seed.coord, seed.depth
        else:
            (contact, coord), depth = seed, 1
        if contact.peer_id in seen or not lk.accept(contact):
            continue
        seen.add(contact.peer_id)
        walks[n % len(walks)].add(contact, depth, coord)
        n += 1
    if len(walks) == 1:
        await walks[0].run()
    else:
        async with trio.open_nursery() as nursery:
            lk.on_stop = nursery.cancel_scope.cancel
            for w in walks:
                nursery.start_soon(w.run)
    merged: dict[str, Candidate] = {}
    for w in walks:
        for c in w.cands.values():
            if c.state != FAILED and (c.contact.peer_id not in merged or c.state == DONE):
                merged[c.contact.peer_id] = c
    cands = sorted(merged.values(), key=lambda c: c.dist)
    closest = [c for c in cands if c.state == DONE][:k]
    for c in cands:  # a later walk must ask again: answers were for this walk's question
        c.state, c.slow = NEW, False
    if lk.stop:
        hops = max(w.stop_depth for w in walks)
    else:
        hops = max((c.depth for c in closest[:1]), default=0)
    return LookupResult([c.contact for c in closest], cands, lk.messages, hops, lk.stop, lk.failed)
