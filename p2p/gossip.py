"""Epidemic broadcast: signed messages pushed to a few random neighbours, plus pull anti-entropy.

Every message is signed by its author; the id is the SHA-256 of the exact bytes that were signed,
and those bytes travel as they are, so no re-encoding can break a signature. A peer checks the
signature (and every field) before it stores, delivers or forwards anything, so a forged message
dies at the first honest peer.

Push: a peer that accepts a new message forwards it once to `fanout` random connected peers (not
the one it came from). Pull: every `pull_interval` (jittered) a peer sends one random neighbour the
ids it holds, and gets back the messages it lacks, so what a push missed (loss, partition, a late
joiner) arrives within a few rounds.

Every peer relays every topic: the swarm has few topics and all peers need them. Subscribing picks
what is delivered to this peer and adds a validator; a message its topic's validator refuses is
neither delivered nor forwarded. Everything is bounded: message size, history age and count,
digest and pull-reply sizes. Messages older than `history_seconds` are refused, which is what
lets the seen-cache forget ids after that long.

Quotas (`GossipQuotas`) stop one author from making every peer relay and hold a flood of its own
(validly signed) messages: per author and topic, a token-bucket rate (messages over it are neither
stored, delivered nor forwarded, so a flood stops at the author's neighbours) and a cap on the
messages and bytes held (older ones are let go, their ids still known); and a cap on the bytes
held in all. Rates are checked only after the signature, so nobody can spend an honest author's
quota; our own publications are not rate-limited. A second bucket per *neighbour* bounds the pushes
of messages new to us that one connection makes us check (a signature each) and forward: many
fresh authors, each within its own quota, cost an attacker a key each and cost every peer a
verification and `fanout` pushes. Pushes over it are dropped before the signature is checked and
not remembered, so a pull brings them later — pulls are ours to pace, which is why they are not
counted.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio

from . import framing
from .errors import BadRequest, FrameError, P2PError
from .identity import Identity, verify_by_peer
from .network import Network, protocol_id

log = logging.getLogger(__name__)

PUSH = protocol_id("gossip")
PULL = protocol_id("gossip-pull")
_SIGNING_DOMAIN = b"potluck-gossip/1\x00"  # a gossip signature can never pass for another record's
MAX_TOPIC_LEN = 128
MAX_PEER_ID_LEN = 64
ID_LEN = 32
SIG_LEN = 64
MAX_CLOCK_SKEW = 30.0  # seconds a message's timestamp may run ahead of ours


@dataclass(frozen=True)
class GossipQuotas:
    """What one author may make a peer accept and hold, per topic, and what a peer holds in all.

    The defaults let a server announce every few seconds and a ledger gossip bursts of credit entries,
    and hold a peer's gossip to a few tens of MB whatever its neighbours send."""

    rate: float = 2.0  # messages per second per (author, topic), sustained
    burst: int = 100  # messages per (author, topic) accepted at once
    max_held: int = 64  # messages held (offered in pulls) per (author, topic); older ones are let go
    max_held_bytes: int = 512 * 1024  # bytes held per (author, topic)
    max_total_bytes: int = 32 * 1024 * 1024  # bytes held for every author and topic together
    max_rated: int = 4096  # (author, topic) rates tracked; the stalest is forgotten beyond
    # Pushes of messages new to us accepted from one neighbour. Honest neighbours share the swarm's
    # whole message rate between them (each message reaches us first through one of them), far below this.
    neighbour_rate: float = 20.0
    neighbour_burst: int = 200


@dataclass(frozen=True)
class GossipMessage:
    id: bytes
    topic: str
    author: str
    seq: int
    timestamp: float  # the author's `Network.now()` at publication
    data: Any
    sender: str  # the neighbour it came from (our own peer id for our publications)


OnMessage = Callable[[GossipMessage], Awaitable[None] | None]
Validator = Callable[[GossipMessage], Awaitable[bool] | bool]


@dataclass
class GossipStats:
    published: int = 0
    accepted: int = 0  # new, valid messages stored (ours included)
    delivered: int = 0  # handed to a subscriber
    duplicates: int = 0
    throttled: int = 0  # authentic, but over its author's rate for the topic
    neighbour_throttled: int = 0  # pushed over the neighbour's rate: dropped unchecked, left for pulls
    let_go: int = 0  # held messages dropped for their author's (or the peer's) cap; ids still known
    dropped_invalid: int = 0  # malformed, forged, unsigned, too old or too new
    rejected: int = 0  # refused by a topic validator
    pushes_sent: int = 0
    push_failures: int = 0
    pulls_sent: int = 0
    pulls_served: int = 0
    pulled: int = 0  # new messages that arrived in pull replies


@dataclass
class _Stored:
    wire: dict  # {"b": signed body, "s": signature}, exactly as received
    timestamp: float
    key: tuple[str, str]  # (author, topic): what its quota is counted against
    size: int


class _Held:
    """The messages held for one (author, topic), oldest first, and their bytes."""

    __slots__ = ("ids", "size")

    def __init__(self) -> None:
        self.ids: deque[bytes] = deque()
        self.size = 0


class _Bucket:
    """A token bucket: `tokens` messages may pass now, refilled at the quota's rate."""

    __slots__ = ("tokens", "at")

    def __init__(self, tokens: float, at: float):
        self.tokens = tokens
        self.at = at


@dataclass
class _Subscription:
    on_message: OnMessage
    validator: Validator | None


class Gossip:
    """One peer's gossip. Start `run` in a nursery; `publish` and deliveries need it running."""

    def __init__(
        self,
        network: Network,
        identity: Identity,
        *,
        fanout: int = 6,
        pull_interval: float = 1.0,
        history_seconds: float = 120.0,
        max_message_bytes: int = 64 * 1024,
        max_history: int = 10_000,
        max_digest: int = 1024,
        max_pull_messages: int = 256,
        max_pull_bytes: int = 1024 * 1024,
        request_timeout: float = 5.0,
        quotas: GossipQuotas = GossipQuotas(),
        rng: random.Random | None = None,
    ):
        if identity.peer_id != network.peer_id:
            raise ValueError("gossip must sign with the network's own identity")
        self.network = network
        self.identity = identity
        self.fanout = fanout
        self.pull_interval = pull_interval
        self.history_seconds = history_seconds
        self.max_message_bytes = max_message_bytes
        self.max_history = max_history
        self.max_digest = max_digest
        self.max_pull_messages = max_pull_messages
        self.max_pull_bytes = max_pull_bytes
        self.request_timeout = request_timeout
        self.quotas = quotas
        self.stats = GossipStats()
        self._rng = rng or random.Random()
        self._subscriptions: dict[str, _Subscription] = {}
        # id -> (forget at, message) for every verified id: accepted ones with their message,
        # validator-refused ones with None. Arrival order is expiry order, so expiry pops the front.
        self._seen: dict[bytes, tuple[float, _Stored | None]] = {}
        self._held: dict[tuple[str, str], _Held] = {}
        self._held_bytes = 0
        self._rates: dict[tuple[str, str], _Bucket] = {}  # per (author, topic)
        self._neighbour_rates: dict[str, _Bucket] = {}  # per neighbour that pushes
        self._seq = 0
        self._nursery: trio.Nursery | None = None

    # --- public ----------------------------------------------------------------------------------

    def subscribe(self, topic: str, on_message: OnMessage, validator: Validator | None = None) -> None:
        """Deliver `topic`'s messages (ours too) to `on_message`; `validator` False or raising drops one."""
        if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC_LEN:
            raise ValueError(f"a topic is a string of 1 to {MAX_TOPIC_LEN} characters")
        self._subscriptions[topic] = _Subscription(on_message, validator)

    async def publish(self, topic: str, data: Any) -> bytes:
        """Sign, deliver locally and push `data`; returns the message id. Raises FrameTooLarge if too big."""
        if self._nursery is None:
            raise RuntimeError("Gossip.run is not running")
        self._seq += 1
        body = framing.encode(
            {"topic": topic, "author": self.identity.peer_id, "seq": self._seq, "ts": self.network.now(), "data": data},
            max_size=self.max_message_bytes,
        )
        wire = {"b": body, "s": self.identity.sign(_SIGNING_DOMAIN + body)}
        message_id = hashlib.sha256(body).digest()
        self.stats.published += 1
        if not await self._accept(wire, self.identity.peer_id):
            raise ValueError(f"the validator of topic {topic!r} refused this message")
        return message_id

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,  # type: ignore[name-defined]  # stale trio-typing stub
    ) -> None:
        """Serve pushes and pulls and pull periodically, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.network.set_request_handler(PUSH, self._on_push)
            self.network.set_request_handler(PULL, self._on_pull)
            task_status.started()
            try:
                while True:
                    await trio.sleep(self.pull_interval * self._rng.uniform(0.5, 1.5))
                    self._forget_expired()
                    peers = self.network.connected_peers()
                    if peers:
                        nursery.start_soon(self._pull, self._rng.choice(peers))
            finally:
                self._nursery = None

    @property
    def held_bytes(self) -> int:
        """Bytes of messages held (offered in pulls), every author and topic together."""
        return self._held_bytes

    def has(self, message_id: bytes) -> bool:
        """Whether this peer holds (accepted) the message."""
        entry = self._seen.get(message_id)
        return entry is not None and entry[1] is not None

    # --- receiving -------------------------------------------------------------------------------

    async def _accept(self, wire: Any, sender: str, *, pushed: bool = False) -> bool:
        """Check, store, forward and deliver one message; True if it was new and valid. A `pushed`
        message is charged to the neighbour `sender` before its signature is checked."""
        try:
            wire = framing.expect_map(wire, "gossip message")
            body = framing.field(wire, "b", bytes, max_len=self.max_message_bytes)
            sig = framing.field(wire, "s", bytes, max_len=SIG_LEN)
        except FrameError as e:
            self.stats.dropped_invalid += 1
            raise BadRequest(str(e)) from None
        message_id = hashlib.sha256(body).digest()
        if message_id in self._seen:  # only verified ids get here, so checking first is safe and cheap
            self.stats.duplicates += 1
            return False
        quotas = self.quotas
        if pushed and not _take_token(self._neighbour_rates, sender, quotas.neighbour_rate, quotas.neighbour_burst,
                                      quotas.max_rated):
            self.stats.neighbour_throttled += 1  # not remembered: a pull may bring it
            return False
        try:
            message = self._check(message_id, body, sig, sender)
        except FrameError as e:
            self.stats.dropped_invalid += 1
            raise BadRequest(str(e)) from None

        key = (message.author, message.topic)
        if message.author != self.identity.peer_id and not _take_token(self._rates, key, quotas.rate, quotas.burst,
                                                                        quotas.max_rated):
            self.stats.throttled += 1
            self._remember(message_id, None)  # not stored, not forwarded: the flood stops here
            return False
        subscription = self._subscriptions.get(message.topic)
        if subscription is not None and subscription.validator is not None and not await _validate(subscription, message):
            self.stats.rejected += 1
            self._remember(message_id, None)  # authentic but refused: no need to look at it again
            return False
        self._remember(message_id, _Stored({"b": body, "s": sig}, message.timestamp, key, len(body) + len(sig)))
        self.stats.accepted += 1
        self._forward(message_id, sender)
        if subscription is not None:
            self.stats.delivered += 1
            try:
                result = subscription.on_message(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("gossip subscriber for %r failed", message.topic)
        return True

    def _check(self, message_id: bytes, body: bytes, sig: bytes, sender: str) -> GossipMessage:
        """The message `body` holds, if its fields, age and signature are all good; else FrameError."""
        fields = framing.expect_map(framing.decode(body), "gossip body")
        topic = framing.field(fields, "topic", str, max_len=MAX_TOPIC_LEN)
        author = framing.field(fields, "author", str, max_len=MAX_PEER_ID_LEN)
        seq = framing.field(fields, "seq", int)
        ts = framing.field(fields, "ts", (float, int))
        if not topic:
            raise FrameError("empty topic")
        if "data" not in fields:
            raise FrameError("missing field 'data'")
        now = self.network.now()
        if not now - self.history_seconds <= ts <= now + MAX_CLOCK_SKEW:
            raise FrameError(f"message timestamp {ts} is outside the accepted window")
        if not verify_by_peer(author, _SIGNING_DOMAIN + body, sig):
            raise FrameError(f"bad signature on a message claiming to be from {author[:64]}")
        return GossipMessage(message_id, topic, author, seq, float(ts), fields["data"], sender)

    def _remember(self, message_id: bytes, stored: _Stored | None) -> None:
        # A message can come back until its timestamp leaves the window (the sender's clock may be
        # MAX_CLOCK_SKEW ahead), so its id is kept that long after it arrived.
        forget_at = trio.current_time() + self.history_seconds + MAX_CLOCK_SKEW
        self._seen[message_id] = (forget_at, stored)
        while len(self._seen) > self.max_history:
            oldest = next(iter(self._seen))
            self._release(oldest, self._seen.pop(oldest)[1])
        if stored is None:
            return
        held = self._held.setdefault(stored.key, _Held())
        held.ids.append(message_id)
        held.size += stored.size
        self._held_bytes += stored.size
        quotas = self.quotas
        while len(held.ids) > quotas.max_held or held.size > quotas.max_held_bytes:
            self._let_go(held.ids[0])
        while self._held_bytes > quotas.max_total_bytes:
            self._let_go(next(i for i, (_, s) in self._seen.items() if s is not None))

    def _let_go(self, message_id: bytes) -> None:
        """Stop holding a message but keep its id known, so that pulls do not bring it back."""
        forget_at, stored = self._seen[message_id]
        self._seen[message_id] = (forget_at, None)
        self._release(message_id, stored)
        self.stats.let_go += 1

    def _release(self, message_id: bytes, stored: _Stored | None) -> None:
        """Take a message that is no longer held off its author's account."""
        if stored is None:
            return
        held = self._held[stored.key]
        if held.ids[0] == message_id:
            held.ids.popleft()
        else:
            held.ids.remove(message_id)
        held.size -= stored.size
        self._held_bytes -= stored.size
        if not held.ids:
            del self._held[stored.key]

    def _forget_expired(self) -> None:
        now = trio.current_time()
        while self._seen and self._seen[oldest := next(iter(self._seen))][0] <= now:
            self._release(oldest, self._seen.pop(oldest)[1])

    # --- push ------------------------------------------------------------------------------------

    def _forward(self, message_id: bytes, sender: str) -> None:
        assert self._nursery is not None
        peers = [p for p in self.network.connected_peers() if p != sender]
        for peer in self._rng.sample(peers, min(self.fanout, len(peers))):
            self._nursery.start_soon(self._push, peer, message_id)

    async def _push(self, peer: str, message_id: bytes) -> None:
        entry = self._seen.get(message_id)
        if entry is None or entry[1] is None:
            return
        stored = entry[1]
        self.stats.pushes_sent += 1
        try:
            await self.network.request(peer, PUSH, stored.wire, timeout=self.request_timeout)
        except P2PError as e:
            # Lost pushes are what pull anti-entropy is for; nothing more to do here.
            self.stats.push_failures += 1
            log.debug("push to %s failed: %s", peer, e)

    async def _on_push(self, peer_id: str, body: Any) -> dict:
        if self._nursery is None:
            raise BadRequest("gossip is not running")
        await self._accept(body, peer_id, pushed=True)
        return {}

    # --- pull ------------------------------------------------------------------------------------

    def _digest(self) -> dict:
        """The ids we hold, newest first, up to `max_digest`; `since` bounds what the peer offers."""
        ids: list[bytes] = []
        since = 0.0
        for message_id, (_, stored) in reversed(self._seen.items()):
            if len(ids) == self.max_digest:
                break
            ids.append(message_id)
            if stored is not None:
                since = stored.timestamp if not since else min(since, stored.timestamp)
        return {"ids": ids, "since": since if len(ids) == self.max_digest else 0.0}

    async def _pull(self, peer: str) -> None:
        self.stats.pulls_sent += 1
        try:
            reply = await self.network.request(peer, PULL, self._digest(), timeout=self.request_timeout)
            messages = framing.field(framing.expect_map(reply, "pull reply"), "msgs", list, max_len=self.max_pull_messages)
        except P2PError as e:
            log.debug("pull from %s failed: %s", peer, e)
            return
        for wire in messages:
            try:
                if await self._accept(wire, peer):
                    self.stats.pulled += 1
            except BadRequest as e:
                log.debug("pull from %s carried a bad message: %s", peer, e)

    async def _on_pull(self, peer_id: str, body: Any) -> dict:
        request = framing.expect_map(body, "pull request")
        ids = framing.field(request, "ids", list, max_len=self.max_digest)
        since = framing.field(request, "since", (float, int))
        if not all(isinstance(i, bytes) and len(i) == ID_LEN for i in ids):
            raise BadRequest(f"a digest holds {ID_LEN}-byte message ids")
        self.stats.pulls_served += 1
        have = set(ids)
        horizon = self.network.now() - self.history_seconds
        out: list[dict] = []
        size = 0
        for message_id, (_, stored) in reversed(self._seen.items()):
            if stored is None or message_id in have or stored.timestamp < max(since, horizon):
                continue
            size += len(stored.wire["b"]) + SIG_LEN
            if len(out) == self.max_pull_messages or size > self.max_pull_bytes:
                break
            out.append(stored.wire)
        return {"msgs": out}


def _take_token(buckets: dict[Any, _Bucket], key: Any, rate: float, burst: int, max_tracked: int) -> bool:
    """Whether `key` may pass one more message now under a token bucket of `rate` and `burst` (and
    count it). At most `max_tracked` keys are tracked: the stalest is forgotten (a fresh full bucket)."""
    now = trio.current_time()
    bucket = buckets.pop(key, None)  # re-inserted last: the dict's order is staleness
    if bucket is None:
        bucket = _Bucket(burst, now)
        while len(buckets) >= max_tracked:
            del buckets[next(iter(buckets))]
    bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * rate)
    bucket.at = now
    buckets[key] = bucket
    if bucket.tokens < 1:
        return False
    bucket.tokens -= 1
    return True


async def _validate(subscription: _Subscription, message: GossipMessage) -> bool:
    assert subscription.validator is not None
    try:
        verdict = subscription.validator(message)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict is True
    except Exception as e:
        log.debug("validator for %r refused a message by raising %r", message.topic, e)
        return False
