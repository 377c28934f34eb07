"""Replication of credit chains, written only against `p2p.network.Network` and `p2p.gossip.Gossip`.

Three paths, all verified before anything is stored (`Ledger.ingest_ranges` checks every signature,
link, sequence number and kind rule; one durable transaction per pull reply):

1. Push (fast): when this peer appends to its own chain it gossips the new entry on
   `credits/entry` — the entry carries its head (author, seq, hash). The topic validator decodes
   it, checks that the gossip author is the entry's author and the signature, so forgeries are not
   even forwarded. A receiver that holds seq-1 ingests it at once; one that is further behind pulls
   the missing range from the neighbour that forwarded it (or the author).
2. Anti-entropy (repair): every `exchange_interval` (jittered) a peer exchanges head vectors with
   one random connected peer (`HEADS`): like Scuttlebutt's vector clocks, each side sends only the
   heads that changed since it last talked to that peer (everything on a first contact, or after a
   failed exchange), plus fork proofs of the authors it mentions; each side then pulls (`RANGE`)
   what the other has and it lacks. Loss, churn and late joiners are all healed by this path.
3. Forks: a peer that meets two different validly signed entries at one (author, seq) stores the
   fork proof, looks for the lowest fork seq in that range, and gossips the proof on `credits/forks`;
   every peer checks it before it keeps or forwards it. A forked author is not replicated past its
   fork point (it is frozen, see `credits.ledger`).

An author that has spent its allowance of entries without receipts (`credits.allowance`) is not
pulled until it could pay for an entry again.

Pulls are batched: one `RANGE` request carries up to `MAX_RANGES` [author, first, last] ranges
(each at most `MAX_RANGE` entries, starting at our own head so that a different entry there shows
a fork); the reply is at most `MAX_REPLY_BYTES`. A head vector is at most `MAX_HEADS` items. Every
decoded field is checked (`framing.field`, `_check_head`, `LogEntry.decode`) and a bad request is
answered with BadRequest.

Costs: a head exchange is one request whose size is the number of feeds that changed since the
last one with that peer; a new entry costs one gossip flood (fanout × peers pushes), which is why
`announce=False` exists for very large simulations (anti-entropy alone still converges).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import trio

from p2p import framing
from p2p.errors import BadRequest, FrameError, P2PError
from p2p.gossip import Gossip, GossipMessage
from p2p.identity import peer_id_from_public_key
from p2p.network import Network, protocol_id

from .entry import HASH_LEN, KEY_LEN, MAX_ENTRY_BYTES, MAX_INT, ForkProof, LogEntry
from .errors import InvalidForkProof
from .ledger import IngestResult, Ledger

log = logging.getLogger(__name__)

HEADS = protocol_id("credits-heads")
RANGE = protocol_id("credits-range")
TOPIC_ENTRY = "credits/entry"
TOPIC_FORK = "credits/forks"
MAX_RANGE = 128  # entries per range
MAX_RANGES = 64  # ranges per request
MAX_REPLY_BYTES = 1024 * 1024
MAX_HEADS = 8192
MAX_FORKS = 256
MAX_FORK_SEARCH = 8  # ranges walked back to find the lowest fork seq


def _check_head(item: Any) -> tuple[bytes, int, bytes]:
    if not isinstance(item, list) or len(item) != 3:
        raise FrameError("a head is [author, seq, hash]")
    author, seq, hash_ = item
    if not isinstance(author, bytes) or len(author) != KEY_LEN:
        raise FrameError("head author must be a 32-byte public key")
    if type(seq) is not int or not 1 <= seq <= MAX_INT:
        raise FrameError("head seq must be a positive integer")
    if not isinstance(hash_, bytes) or len(hash_) != HASH_LEN:
        raise FrameError("head hash must be 32 bytes")
    return author, seq, hash_


class Replicator:
    """Keeps `ledger` in sync with the swarm. Run `run` in the caller's nursery."""

    def __init__(self, ledger: Ledger, network: Network, gossip: Gossip, *, exchange_interval: float = 5.0,
                 request_timeout: float = 5.0, max_pulls: int = 8, announce: bool = True,
                 rng: random.Random | None = None):
        if network.identity.public_key != ledger.me:
            raise ValueError("the ledger and the network must belong to the same identity")
        self.ledger = ledger
        self.network = network
        self.gossip = gossip
        self.exchange_interval = exchange_interval
        self.request_timeout = request_timeout
        self.announce = announce
        self._rng = rng or random.Random()
        self._pull_limit = trio.CapacityLimiter(max_pulls)
        self._told: dict[str, int] = {}  # peer -> ledger.version up to which it has heard our changes
        self._pulling: set[bytes] = set()  # authors with a pull in progress
        self._also: dict[bytes, set[str]] = {}  # author -> other peers that offered it meanwhile
        self._nursery: trio.Nursery | None = None
        self.stats = {"exchanges": 0, "exchange_failures": 0, "pulls": 0, "pulled_entries": 0,
                      "rejected": 0, "throttled": 0, "forks_found": 0, "served_ranges": 0}

    # --- lifecycle ---------------------------------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # stale trio-typing stub
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.network.set_request_handler(HEADS, self._on_heads)
            self.network.set_request_handler(RANGE, self._on_range)
            self.network.add_connection_listener(self._on_connection)
            self.gossip.subscribe(TOPIC_ENTRY, self._on_entry_message, validator=self._valid_entry_message)
            self.gossip.subscribe(TOPIC_FORK, self._on_fork_message, validator=self._valid_fork_message)
            self.ledger.on_append.append(self._on_own_append)
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.exchange_interval * self._rng.uniform(0.5, 1.5))
                    peers = self.network.connected_peers()
                    if peers:
                        nursery.start_soon(self.exchange, self._rng.choice(peers))
            finally:
                self._nursery = None
                if self._on_own_append in self.ledger.on_append:
                    self.ledger.on_append.remove(self._on_own_append)

    def _on_connection(self, peer_id: str, connected: bool) -> None:
        self._told.pop(peer_id, None)  # a new connection starts from a full exchange
        if connected and self._nursery is not None:
            self._nursery.start_soon(self.exchange, peer_id)

    # --- push: own entries and fork proofs over gossip ---------------------------------------------

    def _on_own_append(self, entry: LogEntry) -> None:
        if self.announce and self._nursery is not None:
            self._nursery.start_soon(self._publish, TOPIC_ENTRY, entry.encode())

    async def _publish(self, topic: str, data: Any) -> None:
        try:
            await self.gossip.publish(topic, data)
        except (P2PError, ValueError, RuntimeError) as e:
            log.debug("could not gossip on %s: %s", topic, e)

    def _valid_entry_message(self, message: GossipMessage) -> bool:
        entry = LogEntry.decode(message.data)  # raising = refused
        if peer_id_from_public_key(entry.author) != message.author:
            return False  # only the author announces its own entries
        if self.ledger.throttled(entry.author):
            return False  # its allowance is spent here: neither taken nor forwarded
        entry.verify()
        return True

    async def _on_entry_message(self, message: GossipMessage) -> None:
        entry = LogEntry.decode(message.data)
        if entry.author == self.ledger.me or entry.author in self.ledger.forks or self.ledger.throttled(entry.author):
            return
        head = self.ledger.heads.get(entry.author, (0, b""))[0]
        if entry.seq <= head + 1:
            result = await self.ledger.ingest([message.data])  # extends, repeats, or proves a fork
            self._after_ingest(result, message.sender, entry.author)
            if not result.error:
                return
        # Behind by more than one (or the entry did not link): pull from whoever has it.
        if self._nursery is not None:
            if entry.author not in self._pulling:
                self._pulling.add(entry.author)
                self._nursery.start_soon(self._pull_task, [message.sender, message.author],
                                         [(entry.author, entry.seq, entry.hash)])

    def _valid_fork_message(self, message: GossipMessage) -> bool:
        ForkProof.from_list(message.data).check()
        return True

    async def _on_fork_message(self, message: GossipMessage) -> None:
        try:
            await self.ledger.add_fork_proof(ForkProof.from_list(message.data))
        except InvalidForkProof as e:
            log.debug("bad fork proof from %s: %s", message.sender, e)

    def _after_ingest(self, result: IngestResult, peer: str, author: bytes) -> None:
        if result.error:
            self.stats["rejected"] += 1
            log.info("refused entries of %s from %s: %s", peer_id_from_public_key(author), peer, result.error)
        if result.throttled:
            self.stats["throttled"] += 1
            log.debug("%s has spent its allowance of entries without receipts", peer_id_from_public_key(author))
        if result.fork is not None:
            self.stats["forks_found"] += 1
            log.warning("fork proof: %s signed two entries at seq %d", peer_id_from_public_key(author), result.fork.seq)
            if self._nursery is not None:
                self._nursery.start_soon(self._publish, TOPIC_FORK, result.fork.to_list())
                self._nursery.start_soon(self._find_fork_point, peer, result.fork)

    # --- anti-entropy: head vectors ----------------------------------------------------------------

    def _changes_for(self, peer: str) -> tuple[list[list], list[list], bool]:
        """Heads (and fork proofs) that changed since `peer` last heard from us; all of them on a first contact."""
        since = self._told.get(peer)
        ledger = self.ledger
        if since is None:
            authors = list(ledger.changed)
        else:
            authors = [a for a, v in ledger.changed.items() if v > since]
        complete = len(authors) <= MAX_HEADS
        if not complete:  # most recently changed first; the rest goes next time
            authors.sort(key=lambda a: -ledger.changed[a])
            authors = authors[:MAX_HEADS]
        heads = [[a, *ledger.heads[a]] for a in authors if a in ledger.heads]
        forks = [ledger.forks[a].to_list() for a in authors if a in ledger.forks][:MAX_FORKS]
        return heads, forks, complete

    async def exchange(self, peer: str) -> None:
        """One anti-entropy round with `peer`: swap changed heads, then pull what it has and we lack."""
        full = peer not in self._told
        version = self.ledger.version
        heads, forks, complete = self._changes_for(peer)
        request = {"full": full and complete, "h": heads, "x": forks}
        try:
            reply = framing.expect_map(await self.network.request(peer, HEADS, request, timeout=self.request_timeout))
            their_heads = [_check_head(h) for h in framing.field(reply, "h", list, max_len=MAX_HEADS)]
            their_forks = framing.field(reply, "x", list, max_len=MAX_FORKS)
        except (P2PError, FrameError) as e:
            self.stats["exchange_failures"] += 1
            self._told.pop(peer, None)  # we do not know what arrived: start over with a full vector
            log.debug("head exchange with %s failed: %s", peer, e)
            return
        self.stats["exchanges"] += 1
        if complete:
            self._told[peer] = version
        await self._take_forks(their_forks, peer)
        self._pull_newer(peer, their_heads)

    async def _on_heads(self, peer: str, body: Any) -> dict:
        msg = framing.expect_map(body, "heads request")
        full = framing.field(msg, "full", bool)
        try:
            their_heads = [_check_head(h) for h in framing.field(msg, "h", list, max_len=MAX_HEADS)]
        except FrameError as e:
            raise BadRequest(str(e)) from None
        their_forks = framing.field(msg, "x", list, max_len=MAX_FORKS)
        if full:
            self._told.pop(peer, None)
        theirs = {a: (s, h) for a, s, h in their_heads}
        version = self.ledger.version
        mine, forks, complete = self._changes_for(peer)  # everything, after a `full` request
        reply_heads = []
        for a, s, h in mine:
            other = theirs.get(a)
            if other is None or other[0] < s or (other[0] == s and other[1] != h):
                reply_heads.append([a, s, h])
            if len(reply_heads) == MAX_HEADS:
                complete = False
                break
        if complete:
            self._told[peer] = version
        await self._take_forks(their_forks, peer)
        self._pull_newer(peer, their_heads)
        return {"h": reply_heads, "x": forks}

    async def _take_forks(self, proofs: list, peer: str) -> None:
        for obj in proofs:
            try:
                proof = ForkProof.from_list(obj)
                if await self.ledger.add_fork_proof(proof):
                    self.stats["forks_found"] += 1
            except InvalidForkProof as e:
                log.info("bad fork proof from %s: %s", peer, e)

    def _pull_newer(self, peer: str, heads: list[tuple[bytes, int, bytes]]) -> None:
        """Pull, in one batch, every head `peer` has that is newer than ours (or differs at our seq)."""
        if self._nursery is None:
            return
        wants = []
        for author, seq, hash_ in heads:
            if author == self.ledger.me or author in self.ledger.forks or self.ledger.throttled(author):
                continue  # a throttled author is pulled again once its allowance refills and a head says so
            if author in self._pulling:
                self._also.setdefault(author, set()).add(peer)  # retried via a full exchange if that pull fails
                continue
            mine = self.ledger.heads.get(author)
            if mine is None or mine[0] < seq or (mine[0] == seq and mine[1] != hash_):
                self._pulling.add(author)
                wants.append((author, seq, hash_))
        if wants:
            self._nursery.start_soon(self._pull_task, [peer], wants)

    # --- pulling ranges ----------------------------------------------------------------------------

    async def _pull_task(self, peers: list[str], wants: list[tuple[bytes, int, bytes]]) -> None:
        """Pull `wants` from the first of `peers` that has them; the authors must be in `_pulling`."""
        missing = wants
        try:
            for peer in dict.fromkeys(peers):
                if peer == self.network.peer_id:
                    continue
                missing = await self.pull(peer, missing)
                if not missing:
                    return
        finally:
            failed = {p for p in peers if p != self.network.peer_id} if missing else set()
            for author, _, _ in wants:
                self._pulling.discard(author)
                others = self._also.pop(author, set())
                if any(author == m[0] for m in missing) and author not in self.ledger.forks:
                    failed |= others
            # What these peers told us is not in hand yet: have them tell us again (a full exchange)
            # rather than forget it, since otherwise they only send what changed.
            for p in failed:
                self._told.pop(p, None)

    def _done(self, author: bytes, seq: int, hash_: bytes) -> bool:
        mine, my_hash = self.ledger.heads.get(author, (0, b""))
        return mine > seq or (mine == seq and my_hash == hash_) or author in self.ledger.forks

    async def pull(self, peer: str, wants: list[tuple[bytes, int, bytes]]) -> list[tuple[bytes, int, bytes]]:
        """Pull each (author, seq, hash) in `wants` from `peer`, batching up to `MAX_RANGES` ranges per
        request and ingesting each range in one transaction. Returns the wants still not met."""
        pending = [w for w in wants if not self._done(*w)]
        stalled: list[tuple[bytes, int, bytes]] = []
        async with self._pull_limit:
            while pending:
                batch, pending = pending[:MAX_RANGES], pending[MAX_RANGES:]
                ranges = []
                for author, seq, _ in batch:
                    mine = self.ledger.heads.get(author, (0, b""))[0]
                    first = max(1, mine)  # overlap one entry: a different one there is a fork
                    ranges.append([author, first, min(max(seq, first), first + MAX_RANGE - 1)])
                replies = await self._request_ranges(peer, ranges)
                if replies is None:
                    return stalled + batch + pending
                got = [(want, wires) for want, wires in zip(batch, replies) if wires]
                stalled += [want for want, wires in zip(batch, replies) if not wires]
                results = await self.ledger.ingest_ranges([wires for _, wires in got])  # one transaction
                for (want, _), result in zip(got, results):
                    self.stats["pulls"] += 1
                    self.stats["pulled_entries"] += result.stored
                    self._after_ingest(result, peer, want[0])
                    if self._done(*want):
                        continue
                    if result.error or result.fork or result.frozen or result.throttled or result.stored == 0:
                        stalled.append(want)  # a bad or a stale peer: others (or a later round) will do
                    else:
                        pending.append(want)  # more than one range behind: go on
        return stalled

    async def _request_ranges(self, peer: str, ranges: list[list]) -> list[list[bytes]] | None:
        """Ask `peer` for several [author, first, last] ranges; a list of encoded entries per range, or None."""
        try:
            reply = framing.expect_map(await self.network.request(
                peer, RANGE, {"r": ranges}, timeout=self.request_timeout))
            lists = framing.field(reply, "e", list, max_len=len(ranges))
            out = []
            for (_, first, last), wires in zip(ranges, lists):
                if not isinstance(wires, list) or len(wires) > last - first + 1:
                    raise FrameError("a range reply holds more entries than asked for")
                if not all(isinstance(w, bytes) and len(w) <= MAX_ENTRY_BYTES for w in wires):
                    raise FrameError("a range reply holds something that is not an entry")
                out.append(wires)
        except (P2PError, FrameError) as e:
            log.debug("range pull from %s failed: %s", peer, e)
            return None
        return out + [[] for _ in range(len(ranges) - len(out))]

    async def _on_range(self, peer: str, body: Any) -> dict:
        msg = framing.expect_map(body, "range request")
        ranges = framing.field(msg, "r", list, max_len=MAX_RANGES)
        checked = []
        for item in ranges:
            if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes) and len(item[0]) == KEY_LEN
                    and type(item[1]) is int and type(item[2]) is int and 1 <= item[1] <= item[2] <= MAX_INT
                    and item[2] - item[1] < MAX_RANGE):
                raise BadRequest(f"a range is [author key, first, last] with 1 <= first <= last < first + {MAX_RANGE}")
            checked.append((item[0], item[1], item[2]))
        self.stats["served_ranges"] += len(checked)
        return {"e": await self.ledger.read_ranges(checked, MAX_REPLY_BYTES)}

    async def _find_fork_point(self, peer: str, proof: ForkProof) -> None:
        """Walk back through `peer`'s branch to the lowest seq where it differs from ours, so every peer
        ends with the same (lowest) proof and folds the same prefix."""
        author, seq = proof.author, proof.seq
        for _ in range(MAX_FORK_SEARCH):
            if seq <= 1:
                return
            first = max(1, seq - MAX_RANGE)
            replies = await self._request_ranges(peer, [[author, first, seq - 1]])
            if not replies or not replies[0]:
                return
            wires = replies[0]
            result = await self.ledger.ingest(wires)  # entries below the fork compare with ours
            if result.fork is None:
                return
            self.stats["forks_found"] += 1
            await self._publish(TOPIC_FORK, result.fork.to_list())
            if result.fork.seq > first:
                return
            seq = result.fork.seq
