"""Relay announcements: how peers behind NAT find the swarm's relay services.

A peer started with `--relay-service` stores a signed DHT entry under `relays/<swarm>` (its own peer
id as the subkey: one entry per relay, no suffixes) holding where it can be dialled (`relay_addrs`:
once autonat finds it public, the addresses peers dialled it back at, then those it listens on,
never 0.0.0.0) and its region, and re-stores it every `RelayAnnouncing.period`; the entry expires `ttl` after it was signed, so a relay
that stops is forgotten. Its presence note (gossip) says `"relay": true` too, which peers hear
between DHT reads.

Bounded: the DHT holds at most `MAX_RELAY_RECORDS` entries in a `relays/` record (validator
`RelayRecordValidator`, `dht.Validators.register(..., max_entries=...)`), each at most `MAX_ADDRS`
direct addresses of its own signer. `RelayBook`, where a peer keeps the relays it heard of, holds at
most `MAX_CANDIDATES` read from the DHT and `MAX_NOTED` heard of only in presence notes (the least
recently heard dropped first, never one in use), each until its entry or note expires.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import trio

from dht.records import InvalidRecord, SignedValue
from p2p import framing
from p2p.errors import BadRequest, P2PError
from p2p.libp2p.addresses import may_dial, may_dial_local, routable, tcp_endpoint
from p2p.membership import check_addr

log = logging.getLogger(__name__)

RELAY_NAMESPACE = "relays"
MAX_RELAY_RECORDS = 64  # entries one `relays/` record holds at a DHT node
MAX_ADDRS = 4
MAX_REGION_LEN = 64
MAX_CANDIDATES = 32
MAX_NOTED = 4  # relays heard of only in presence notes


def relay_key(swarm_key: bytes | None) -> str:
    """The DHT key relays of this swarm announce under: `relays/open`, or `relays/<tag of the swarm key>`."""
    if swarm_key is None:
        return f"{RELAY_NAMESPACE}/open"
    tag = hashlib.sha256(b"potluck-relays\0" + swarm_key).hexdigest()[:16]
    return f"{RELAY_NAMESPACE}/{tag}"


@dataclass(frozen=True)
class RelayAd:
    """One relay as announced: its peer id, direct addresses (each ending /p2p/<id>), region, and until when."""

    peer_id: str
    addrs: tuple[str, ...]
    region: str
    expires: float


def parse_relay_value(owner: str, value: Any, expires: float) -> RelayAd:
    """Strictly decode a relay announcement signed by `owner`; BadRequest when malformed."""
    body = framing.expect_map(value, "relay announcement")
    addrs = framing.field(body, "addrs", list, max_len=MAX_ADDRS)
    region = framing.field(body, "region", str, max_len=MAX_REGION_LEN)
    for addr in addrs:
        check_addr(addr, owner)
        if "/p2p-circuit" in addr:
            raise BadRequest("a relay announces its direct addresses, not a circuit")
    if not addrs:
        raise BadRequest("a relay announcement names at least one address")
    return RelayAd(owner, tuple(addrs), region, expires)


class RelayRecordValidator:
    """DHT validator for `relays/`: one well-formed entry per relay, under its bare peer id."""

    def validate(self, entry: SignedValue) -> None:
        if entry.subkey != entry.owner:
            raise InvalidRecord("a relay announces under its peer id alone (no suffix)")
        try:
            parse_relay_value(entry.owner, entry.value, entry.expires)
        except (BadRequest, framing.FrameError) as e:
            raise InvalidRecord(str(e)) from None

    def select(self, current: SignedValue, new: SignedValue) -> SignedValue:
        return new if (new.expires, new.signature) > (current.expires, current.signature) else current


class RelayBook:
    """The relays this peer heard of, each until its announcement expires: at most `max_candidates`
    read from the DHT (signed entries the DHT bounds), and at most `max_noted` more heard only in
    presence notes (anyone can gossip one, so Sybils' notes push out only each other). A note from a
    relay read from the DHT extends its entry. Relays `in_use` (we hold or seek a reservation there)
    are never pushed out; the least recently heard of the others go first."""

    def __init__(self, own_id: str, now: Callable[[], float], max_candidates: int = MAX_CANDIDATES,
                 max_noted: int = MAX_NOTED, in_use: Callable[[str], bool] = lambda relay_id: False):
        self.own_id = own_id
        self.now = now
        self.max_candidates = max_candidates
        self.max_noted = max_noted
        self.in_use = in_use
        self._ads: dict[str, RelayAd] = {}  # read from the DHT, least recently heard first
        self._noted: dict[str, RelayAd] = {}  # heard only in presence notes, least recently heard first

    def hear(self, ad: RelayAd) -> None:
        """A relay's announcement read from the DHT."""
        if ad.peer_id == self.own_id or ad.expires <= self.now():
            return
        known = self._ads.pop(ad.peer_id, None)
        if known is not None and known.expires > ad.expires:
            ad = known
        self._noted.pop(ad.peer_id, None)
        self._ads[ad.peer_id] = ad
        self._bound(self._ads, self.max_candidates)

    def hear_note(self, ad: RelayAd) -> None:
        """A relay's presence note: extends the entry of a relay read from the DHT, else takes one of
        the few places for relays heard of only this way."""
        if ad.peer_id == self.own_id or ad.expires <= self.now():
            return
        known = self._ads.get(ad.peer_id)
        if known is not None:
            if ad.expires > known.expires:
                self._ads[ad.peer_id] = RelayAd(known.peer_id, known.addrs, known.region, ad.expires)
            return
        self._noted.pop(ad.peer_id, None)
        self._noted[ad.peer_id] = ad
        self._bound(self._noted, self.max_noted)

    def _bound(self, ads: dict[str, RelayAd], most: int) -> None:
        for peer_id in [p for p in ads if not self.in_use(p)][: max(0, len(ads) - most)]:
            del ads[peer_id]

    def hear_entries(self, entries: dict[str, SignedValue]) -> None:
        """Every valid entry of a `relays/` record read from the DHT."""
        for entry in entries.values():
            try:
                self.hear(parse_relay_value(entry.owner, entry.value, entry.expires))
            except (BadRequest, framing.FrameError) as e:
                log.debug("dropped a relay announcement from %s: %s", entry.owner[-12:], e)

    def relays(self) -> list[RelayAd]:
        now = self.now()
        for ads in (self._ads, self._noted):
            for peer_id, ad in list(ads.items()):
                if ad.expires <= now:
                    del ads[peer_id]
        return [*self._ads.values(), *self._noted.values()]


def relay_addrs(reachability: dict, direct: list[str], peer_id: str) -> list[str]:
    """Where a relay service can be dialled, from its `reachability()` and listen addresses: nothing
    until peers dialled it back (a relay behind NAT is no relay); then the addresses they reached it
    at, and those it listens on, except this host's and its link's (loopback only while it listens on
    loopback alone), internet-routable ones first."""
    if reachability.get("status") != "public":
        return []
    reached = [a if "/p2p/" in a else f"{a}/p2p/{peer_id}" for a in reachability.get("reachable_addrs", [])]
    ours = [e[0] for e in map(tcp_endpoint, direct) if e is not None]
    candidates = plain_addrs([*reached, *direct])
    return [a for a in candidates if may_dial_local(_ip_of(a), ours)][:MAX_ADDRS]


def plain_addrs(addrs: list[str]) -> list[str]:
    """The plain /ip4|ip6/<ip>/tcp/<port>/p2p/<id> addresses among `addrs`, without unspecified IPs
    (0.0.0.0, ::) or repeats, internet-routable ones first (else a LAN address, sorted first as text,
    is all a remote peer tries)."""
    plain = [a for a in dict.fromkeys(addrs) if "/p2p/" in a and tcp_endpoint(a) is not None]
    plain = [a for a in plain if not ipaddress.ip_address(_ip_of(a)).is_unspecified]
    return sorted(plain, key=lambda a: not routable(_ip_of(a)))


def dial_addrs(ad: RelayAd, ours: list[str]) -> list[str]:
    """The addresses of a relay we may dial (`p2p.libp2p.addresses.may_dial`, given our own IPs
    `ours`), internet-routable ones first; none for a relay that names only this host, its link, or
    a private network we are not in."""
    return [a for a in plain_addrs(list(ad.addrs)) if may_dial(_ip_of(a), ours)]


def _ip_of(addr: str) -> str:
    endpoint = tcp_endpoint(addr)
    assert endpoint is not None  # plain addresses only
    return endpoint[0]


class RelayDirectory(Protocol):
    """What relay announcing and reading need of the DHT."""

    async def store(self, key: str, value: Any, *, ttl: float | None = None, suffix: str = "",
                    levels: list[int] | None = None, republish: bool = True) -> int: ...

    async def get(self, key: str, *, quorum: int = 1, secure: bool = False, exhaustive: bool = False,
                  levels: list[int] | None = None) -> dict[str, SignedValue]: ...


@dataclass
class RelayAnnouncing:
    """A relay service's announcement loop: store at once, again at 1, 2, 4 ... s while the swarm
    forms (the DHT does not hand records to peers that join later), then every `period`."""

    dht: RelayDirectory
    key: str
    addrs: Callable[[], list[str]]  # where we can be dialled (`relay_addrs`); none yet: not announced
    region: str
    ttl: float = 1800.0
    period: float = 600.0
    wait: float = 2.0  # seconds between looks while we have no address to announce

    async def run(self) -> None:
        fast = 1.0
        while True:
            addrs = self.addrs()[:MAX_ADDRS]
            if not addrs:
                await trio.sleep(self.wait)
                continue
            try:
                await self.dht.store(self.key, {"addrs": addrs, "region": self.region}, ttl=self.ttl, republish=False)
            except P2PError as e:
                log.info("relay announcement failed: %s", e)
            if fast < self.period:
                await trio.sleep(fast)
                fast *= 2
            else:
                await trio.sleep(self.period)
