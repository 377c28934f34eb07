"""α-parallel iterative lookups, optionally over d disjoint paths.

`iterative_lookup` walks towards a target id: keep a shortlist of candidates sorted by XOR
distance, keep α queries in flight, add the contacts each reply brings, and stop when the k closest
live candidates have all answered (or when the caller's `query` says it found what it wanted).

Robustness (liars answer with floods of fake contacts that sort closest to the target and never answer):
- A query that has not answered within its soft timeout (a few expected RTTs) is given up on for
  now: it stops counting against α and takes no place in the window, so the next candidate is
  asked. Its answer is still used if it arrives before the hard timeout (enforced by `query`), and
  the walk waits for it only once nothing else is left to ask, unless a suspect offered it.
- Every candidate remembers which peers offered it (its referrers; seeds have none). A referrer
  that has not yet had an offer answer in this walk gets one query in flight at a time, so an
  unknown liar holds at most one α slot; a referrer whose offers mostly fail (FAILED or given up,
  twice at least: one dead contact is no lie) is suspect, and candidates only suspects offered
  drop out of the ranking — they are asked only when nothing else is under way, are trimmed first
  (then those no proven referrer vouches for), and are not handed on to a later walk. Suspicion
  rests on soft timeouts, which are guesses: a patient walk (one that must find the true closest)
  skips suspects' offers only once it knows `need` peers that others offered.
- One answer may inject at most k new candidates (an honest answer lists at most k), the closest
  of those it offers, and the shortlist is trimmed to a bounded size.
- Failed peers are never counted among the closest; `accept` drops contacts the node refuses
  (invalid, blacklisted, puzzle not solved, ourselves).
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
    slow: bool = False  # given up on for this walk (soft timeout); a late answer still counts
    soft_deadline: float = 0.0
    referrers: list[str] = field(default_factory=list)  # peers whose answers offered it; [] = a seed


@dataclass(slots=True)
class Referrer:
    """How the contacts one peer offered in this walk fared."""

    in_flight: int = 0
    answered: int = 0
    failed: int = 0  # FAILED or given up on (a late answer moves it back to `answered`)

    @property
    def proven(self) -> bool:
        return self.answered > 0

    @property
    def suspect(self) -> bool:
        return self.failed >= 2 and self.failed > self.answered  # one dead contact is no lie


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
        self.referrers: dict[str, Referrer] = {}
        self.heard = 0  # candidates ever added

    def add(self, contact: Contact, depth: int, coord: Coord | None, referrer: str | None = None) -> bool:
        """Add a candidate (or note one more referrer of a known one); True if it is new."""
        lk = self.lookup
        c = self.cands.get(contact.peer_id)
        if c is not None:
            if depth < c.depth:
                c.depth = depth
            if c.coord is None and coord is not None:
                c.coord = coord
            if referrer is not None and c.state == NEW and c.referrers and referrer not in c.referrers:
                c.referrers.append(referrer)
                self.dirty = True
            return False
        owner = lk.claimed.get(contact.peer_id)
        if owner is not None and owner != self.index:
            return False
        self.cands[contact.peer_id] = Candidate(contact, contact.id ^ lk.target, depth, coord,
                                                referrers=[] if referrer is None else [referrer])
        self.heard += 1
        self.dirty = True
        return True

    def _referrer(self, peer_id: str) -> Referrer:
        r = self.referrers.get(peer_id)
        if r is None:
            r = self.referrers[peer_id] = Referrer()
        return r

    def suspect(self, c: Candidate) -> bool:
        """Only suspect referrers offered it (a seed, or a contact any other peer vouched for, is not)."""
        if not c.referrers:
            return False
        return all(r in self.referrers and self.referrers[r].suspect for r in c.referrers)

    def vouched(self, c: Candidate) -> bool:
        """A seed, offered by two peers, or by one whose offers have answered."""
        if len(c.referrers) != 1:
            return True
        r = self.referrers.get(c.referrers[0])
        return r is not None and r.proven

    def throttled(self, c: Candidate) -> bool:
        """Every referrer of `c` is unproven and already has a query in flight."""
        if not c.referrers:
            return False
        for peer_id in c.referrers:
            r = self.referrers.get(peer_id)
            if r is None or r.proven or not r.in_flight:
                return False
        return True

    def ordered(self) -> list[Candidate]:
        if self.dirty:
            live = sorted((c for c in self.cands.values() if c.state != FAILED), key=lambda c: c.dist)
            limit = self.lookup.max_candidates
            if len(live) > limit:
                # Forget never-queried candidates: suspects' offers first, then far ones. The k closest
                # vouched for stay, however many offers sort ahead of them; unvouched ones closer than
                # the rest stay too (an honest answer near the target is unvouched at first).
                keep = {c.contact.peer_id for c in live if c.state != NEW}
                keep.update(c.contact.peer_id for c in
                            [c for c in live if self.vouched(c) and not self.suspect(c)][: self.lookup.k])
                for c in sorted(live, key=lambda c: (self.suspect(c), c.dist)):
                    if len(keep) >= limit:
                        break
                    keep.add(c.contact.peer_id)
                for c in live:
                    if c.contact.peer_id not in keep:
                        del self.cands[c.contact.peer_id]
                live = [c for c in live if c.contact.peer_id in keep]
            self.sorted = live
            self.dirty = False
        return self.sorted

    def mine(self) -> list[Candidate]:
        """Live candidates this walk may ask (not claimed by another disjoint walk), closest first."""
        claimed, me = self.lookup.claimed, self.index
        return [c for c in self.ordered() if claimed.get(c.contact.peer_id, me) == me]

    def ranked(self, *, with_suspects: bool = False) -> list[Candidate]:
        """The walk's ranking, closest first: live candidates not offered only by suspects (unless asked for)."""
        return [c for c in self.mine() if with_suspects or not self.suspect(c)]

    def finished(self) -> bool:
        """The `need` closest ranked candidates have all answered (or nothing is left to ask or wait
        for). One given up on still counts here (its late answer may matter): it only holds the walk
        up once nothing else is left to ask — unless only suspects offered it. A walk that has heard
        of fewer than `need` peers skips no one: it asks and waits for suspects' offers too. For a
        patient walk only peers that someone beyond suspicion offered count: a referrer turns
        suspect on soft timeouts alone, which are guesses (a newcomer measures only its bootstrap
        peer, and its first offers, far away, all answer late), and a self-lookup that ended on that
        guess would leave a joining peer unknown to its neighbours."""
        need = self.lookup.need
        top = self.ranked()[:need]
        heard = self.trusted_heard() if self.lookup.patient else self.heard
        if top and all(c.state == DONE for c in top) and (len(top) == need or heard >= need):
            return True
        return not any(c.state in (NEW, INFLIGHT) for c in self.mine())

    def trusted_heard(self) -> int:
        """Candidates (answered, failed or not yet asked) not offered only by suspects."""
        return sum(1 for c in self.cands.values() if not self.suspect(c))

    def pick(self, *, with_suspects: bool) -> Candidate | None:
        lk = self.lookup
        # candidates given up on or held back take no place in the window: the walk goes on past them
        live = [c for c in self.ranked(with_suspects=with_suspects)
                if not (c.slow and c.state == INFLIGHT) and not (c.state == NEW and self.throttled(c))]

        def askable(c: Candidate) -> bool:
            return c.state == NEW and lk.claimed.get(c.contact.peer_id, self.index) == self.index

        if lk.select == "xor":
            for c in live[: max(lk.k, lk.alpha)]:
                if askable(c):
                    return c
            return None
        best, best_rtt = None, math.inf
        for c in live[: lk.window]:
            if not askable(c):
                continue
            rtt = lk.rtt(c.contact.peer_id, c.coord)
            if rtt < best_rtt:
                best, best_rtt = c, rtt
        if best is None:  # nothing new in the window: the walk goes on with the closest beyond it
            for c in live[lk.window : max(lk.k, lk.alpha)]:
                if askable(c):
                    return c
        return best

    async def run(self) -> None:
        lk = self.lookup
        send, recv = trio.open_memory_channel(math.inf)
        async with trio.open_nursery() as nursery:
            active = 0
            while not lk.stop:
                while active < lk.alpha:
                    c = self.pick(with_suspects=False)
                    if c is None and not active and not self.finished():
                        c = self.pick(with_suspects=True)  # only suspects' offers are left
                    if c is None:
                        break
                    lk.claimed[c.contact.peer_id] = self.index
                    c.state = INFLIGHT
                    c.soft_deadline = trio.current_time() + lk.soft_timeout(c.contact.peer_id, c.coord)
                    for peer_id in c.referrers:
                        self._referrer(peer_id).in_flight += 1
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
                        self.dirty = True
                        for peer_id in c.referrers:
                            r = self._referrer(peer_id)
                            r.in_flight -= 1
                            r.failed += 1
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
        failed = isinstance(result, BaseException)
        for peer_id in c.referrers:
            r = self._referrer(peer_id)
            if c.slow:  # counted as failed when it was given up on
                if not failed:
                    r.failed -= 1
                    r.answered += 1
            else:
                r.in_flight -= 1
                if failed:
                    r.failed += 1
                else:
                    r.answered += 1
        if isinstance(result, BaseException):
            c.state = FAILED
            lk.failed.append(c.contact.peer_id)
            return
        c.state = DONE
        contacts, stop = result
        offered = sorted((pair for pair in contacts if lk.accept(pair[0])), key=lambda pair: pair[0].id ^ lk.target)
        new = 0
        for contact, coord in offered:
            if new >= lk.k and contact.peer_id not in self.cands:
                continue  # this answer has injected its share
            new += self.add(contact, c.depth + 1, coord, c.contact.peer_id)
        if stop:
            lk.stop = True
            self.stop_depth = c.depth
            if lk.on_stop is not None:
                lk.on_stop()


class _Lookup:
    def __init__(self, target: int, query: QueryFn, *, k: int, alpha: int, need: int, select: str, window: int,
                 rtt: Callable[[str, Coord | None], float], soft_timeout: Callable[[str, Coord | None], float],
                 accept: Callable[[Contact], bool], max_candidates: int, patient: bool):
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
        self.patient = patient
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
    patient: bool = True,
) -> LookupResult:
    """Walk towards `target` from `seeds` (pairs of contact + coordinate hint, or candidates of an
    earlier walk, whose depth carries over). `need`: how many of the closest must have answered for
    the walk to end (default k; smaller = give up sooner on a value that is not there). `patient`:
    the walk must find the true closest (joins, refreshes, stores) and skips suspects' offers only
    once it knows `need` peers that others offered; a read (False) skips them once it has heard of
    `need` peers in all, so liars' black holes hold it up less."""
    if select not in ("xor", "rtt"):
        raise ValueError("select is 'xor' or 'rtt'")
    lk = _Lookup(target, query, k=k, alpha=alpha, need=need or k, select=select, window=window or alpha * 2,
                 rtt=rtt, soft_timeout=soft_timeout, accept=accept, max_candidates=max(3 * k, 30),
                 patient=patient)
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
            if c.state == FAILED or (c.state != DONE and (c.slow or w.suspect(c))):
                continue  # given up on, or offered only by suspects: no seed for a later walk
            if c.contact.peer_id not in merged or c.state == DONE:
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
