"""Shared attestations: "my checks verified N steps of server S", signed, for other clients' probation.

BOINC's adaptive replication, shared. A client's spot check (pipeline/spotcheck.py) that verifies a
server's steps tells its `AttestationBook` (`verified`); every `interval` the book signs one
`Attestation` per (server, model, span) with the steps verified since the last one — server, model,
span, steps, signer (the client), time — and publishes it on the gossip topic `TOPIC`. Other peers'
books take it in, and their `AdaptivePolicy` (pipeline/checkpolicy.py) counts it toward that
server's verified steps through `vouches(model_id)`.

Sybil bounds — attestations are free to make, so what they can buy is capped here, on the reading side:
- only a signer with standing (credits.standing) in *this* peer's own view counts (its work reached
  us; a fresh key has none), checked when an attestation arrives (none is stored otherwise, so
  strangers cannot fill the table) and again whenever the count is read;
- each signer's contribution to a server is capped (`max_per_signer` steps);
- the policy caps all attestations together below its probation count (`AdaptivePolicy.max_vouched`,
  half of it by default): a server always serves part of its probation under our own checks;
- a mismatch we see ourselves resets the server for good: the policy ignores attestations for a
  server that ever failed one of our checks.

Bounded and typed: an attestation is at most `MAX_BYTES` encoded, every field type- and range-checked,
its signature (domain-separated, by the signer's peer id) verified before anything is kept, and only
newer ones than the last kept per (server, signer) count (no replays). The book holds at most
`max_servers` (model, server) entries (least recently attested dropped) of at most `max_signers`
signers each; the gossip layer rate-limits and bounds what each author makes a peer hold
(p2p/gossip.py `GossipQuotas`). It lives in memory: a restarted peer starts with an empty book.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Protocol

import msgpack
import trio

from p2p.errors import FrameError
from p2p.gossip import GossipMessage, OnMessage, Validator
from p2p.identity import Identity, public_key_from_peer_id, verify_by_peer

log = logging.getLogger(__name__)

TOPIC = "potluck/attestations/1"
DOMAIN = b"potluck-attestation/1\x00"  # an attestation's signature can never pass for another record's
MAX_BYTES = 512  # an encoded attestation (body and signature)
MAX_ID_LEN = 64  # a peer id
MAX_MODEL_LEN = 128
MAX_BLOCK = 1 << 16
MAX_STEPS = 1 << 20


class InvalidAttestation(FrameError):
    """An attestation that is malformed, oversized, or not signed by its signer."""


@dataclass(frozen=True)
class Attestation:
    server: str  # peer id of the server whose steps were verified
    model: str
    start: int
    end: int
    steps: int  # steps verified since the signer's previous attestation for this server and span
    signer: str  # peer id of the client that checked
    t: float  # the signer's network time
    sig: bytes = b""

    def body(self) -> bytes:
        return msgpack.packb([self.server, self.model, self.start, self.end, self.steps, self.signer, self.t])

    @classmethod
    def signed(cls, identity: Identity, server: str, model: str, start: int, end: int, steps: int,
               t: float) -> "Attestation":
        unsigned = cls(server, model, start, end, steps, identity.peer_id, t)
        return cls(server, model, start, end, steps, identity.peer_id, t, identity.sign(DOMAIN + unsigned.body()))

    def encode(self) -> list:
        return [self.body(), self.sig]

    @classmethod
    def decode(cls, wire: Any) -> "Attestation":
        """A checked attestation from `encode`'s form; raises InvalidAttestation."""
        if not isinstance(wire, list) or len(wire) != 2 or not all(isinstance(x, bytes) for x in wire):
            raise InvalidAttestation("an attestation is [body, signature]")
        body, sig = wire
        if len(body) + len(sig) > MAX_BYTES:
            raise InvalidAttestation(f"attestation of {len(body) + len(sig)} bytes > {MAX_BYTES}")
        try:
            fields = msgpack.unpackb(body, raw=False, strict_map_key=True)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise InvalidAttestation(f"attestation body is not msgpack: {e}") from e
        if not isinstance(fields, list) or len(fields) != 7:
            raise InvalidAttestation("attestation body is a list of 7 fields")
        server, model, start, end, steps, signer, t = fields
        for name, value, limit in (("server", server, MAX_ID_LEN), ("model", model, MAX_MODEL_LEN),
                                   ("signer", signer, MAX_ID_LEN)):
            if not isinstance(value, str) or not 0 < len(value) <= limit:
                raise InvalidAttestation(f"attestation {name} must be a string of 1..{limit} characters")
        if not all(type(x) is int for x in (start, end, steps)) or not 0 <= start < end <= MAX_BLOCK \
                or not 0 < steps <= MAX_STEPS:
            raise InvalidAttestation("attestation span or steps out of range")
        if not isinstance(t, float) or not math.isfinite(t):
            raise InvalidAttestation("attestation time must be a finite float")
        if server == signer:
            raise InvalidAttestation("a server cannot attest itself")
        if not verify_by_peer(signer, DOMAIN + body, sig):
            raise InvalidAttestation("attestation not signed by its signer")
        return cls(server, model, start, end, steps, signer, t, sig)


class Publisher(Protocol):
    """What the book needs of gossip (p2p/gossip.py `Gossip`)."""

    async def publish(self, topic: str, data: Any) -> bytes: ...

    def subscribe(self, topic: str, on_message: OnMessage, validator: Validator | None = None) -> None: ...


@dataclass
class _Signed:
    """One signer's attested steps of one server (capped), and the time of its latest attestation."""

    steps: int
    t: float


class _ModelVouches:
    """`AttestationBook.vouches`: the book's count for one model (checkpolicy.Vouches)."""

    def __init__(self, book: "AttestationBook", model: str):
        self.book, self.model = book, model

    def steps(self, peer_id: str) -> int:
        return self.book.steps(self.model, peer_id)


@dataclass
class AttestationBook:
    """This peer's attestations: what its checks verified (to publish), and what others' did (to count)."""

    identity: Identity
    standing: Callable[[], Awaitable[Mapping[bytes, int]]]  # this peer's view (credits.StandingView.standings)
    now: Callable[[], float]  # network time (attestations are stamped in it)
    interval: float = 10.0  # seconds between publications of what our checks verified
    max_per_signer: int = 16  # steps one signer can vouch for, per server
    max_signers: int = 16  # signers kept per server (the least recently heard dropped)
    max_servers: int = 4096  # (model, server) entries kept (the least recently attested dropped)
    max_pending: int = 256  # (server, model, span) verified by us, not yet published
    _pending: dict[tuple[str, str, int, int], int] = field(default_factory=dict)
    _heard: OrderedDict[tuple[str, str], OrderedDict[str, _Signed]] = field(default_factory=OrderedDict)
    _standings: Mapping[bytes, int] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=lambda: {"published": 0, "accepted": 0, "refused": 0,
                                                            "no_standing": 0, "stale": 0})

    # --- our checks -----------------------------------------------------------------------------

    def verified(self, server: str, model: str, start: int, end: int, steps: int) -> None:
        """Our check verified `steps` more steps of `server` for [start, end) of `model` (spotcheck's sink)."""
        key = (server, model, start, end)
        if key not in self._pending and len(self._pending) >= self.max_pending:
            return  # published at the next interval; until then, more of the same kind waits
        self._pending[key] = self._pending.get(key, 0) + steps

    def failed(self, server: str) -> None:
        """Our check caught `server`: what we verified of it before is not published (spotcheck's sink)."""
        for key in [k for k in self._pending if k[0] == server]:
            del self._pending[key]

    async def publish_pending(self, gossip: Publisher) -> int:
        """Sign and publish one attestation per (server, model, span) verified since the last call."""
        pending, self._pending = self._pending, {}
        for (server, model, start, end), steps in pending.items():
            att = Attestation.signed(self.identity, server, model, start, end, min(steps, MAX_STEPS), self.now())
            await gossip.publish(TOPIC, att.encode())
            self.stats["published"] += 1
        return len(pending)

    async def run(self, gossip: Publisher, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe to others' attestations and publish ours every `interval` seconds."""
        gossip.subscribe(TOPIC, self._on_message, validator=_valid)
        task_status.started()
        while True:
            await trio.sleep(self.interval)
            await self.publish_pending(gossip)

    # --- others' checks -------------------------------------------------------------------------

    async def _on_message(self, message: GossipMessage) -> None:
        try:
            att = Attestation.decode(message.data)
        except InvalidAttestation:  # our validator refuses these before delivery; a second look costs little
            self.stats["refused"] += 1
            return
        if att.signer != message.author:
            self.stats["refused"] += 1
            return
        await self.hear(att)

    async def hear(self, att: Attestation) -> bool:
        """Keep `att` (already decoded, so checked) if its signer has standing here; whether it was kept."""
        if att.signer == self.identity.peer_id:
            return False
        self._standings = await self.standing()
        if self._standings.get(public_key_from_peer_id(att.signer), 0) <= 0:
            self.stats["no_standing"] += 1
            return False
        key = (att.model, att.server)
        signers = self._heard.pop(key, None) or OrderedDict()
        self._heard[key] = signers  # most recently attested last
        while len(self._heard) > self.max_servers:
            self._heard.popitem(last=False)
        known = signers.pop(att.signer, None)
        if known is not None and att.t <= known.t:
            signers[att.signer] = known
            self.stats["stale"] += 1
            return False
        steps = min(self.max_per_signer, att.steps + (known.steps if known else 0))
        signers[att.signer] = _Signed(steps, att.t)
        while len(signers) > self.max_signers:
            signers.popitem(last=False)
        self.stats["accepted"] += 1
        return True

    def steps(self, model: str, server: str) -> int:
        """Steps of `server` others vouch for, counting only signers with standing in our latest view."""
        signers = self._heard.get((model, server))
        if not signers:
            return 0
        return sum(s.steps for signer, s in signers.items()
                   if self._standings.get(public_key_from_peer_id(signer), 0) > 0)

    def vouches(self, model: str) -> _ModelVouches:
        """What `AdaptivePolicy.vouches` reads for `model`."""
        return _ModelVouches(self, model)


def _valid(message: GossipMessage) -> bool:
    """Gossip validator: a well-formed attestation signed by the message's author (else not forwarded)."""
    att = Attestation.decode(message.data)
    return att.signer == message.author
