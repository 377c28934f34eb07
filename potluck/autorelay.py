"""Automatic relays: a peer that autonat finds behind NAT (`private`) and that was given no `--relay`
picks relays itself from the announcements it heard (`potluck.relays`: the DHT, presence notes).

A relay is dialled only at addresses `relays.dial_addrs` allows (never this host or its link; a private
network only when we are in one), internet-routable ones first, each in turn (`add_relay(also_at=)`).
It keeps reservations on `AutoRelayConfig.want` relays, nearest first where an RTT estimate exists
(the DHT's measured or Vivaldi estimate, then membership's ping RTT). The network keeps each
reservation refreshed (`p2p.libp2p.relay`); this loop replaces a relay that holds no live
reservation and whose last attempt failed (it died, refused us, or broke off), or that has held none
for `reserve_grace`; a replaced relay is not chosen again for `avoid_for` seconds. A relay heard of
later that is much nearer (`nearer_factor`) than the farthest one in use takes its place: reserved
first, the farther one dropped once it holds (one move at a time); nearer by a measured RTT only
(`measured_rtt`: DHT samples, ping), never by a coordinate estimate a relay could fake. When
autonat later finds the peer public, the relays it chose are dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, Sequence

import trio

from p2p.errors import P2PError
from p2p.libp2p.addresses import tcp_endpoint

from .relays import RelayAd, RelayBook, dial_addrs

log = logging.getLogger(__name__)


class RelayClient(Protocol):
    """What the chooser needs of the network (`p2p.libp2p.Libp2pNetwork`)."""

    def reachability(self) -> dict: ...

    def add_relay(self, addr: str, also_at: Sequence[str] = ()) -> str: ...

    def drop_relay(self, relay_id: str) -> None: ...

    def relays_held(self) -> dict[str, tuple[bool, P2PError | None]]: ...

    def direct_addrs(self) -> list[str]: ...

    def confirmed_ips(self) -> list[str]: ...


@dataclass(frozen=True)
class AutoRelayConfig:
    want: int = 2  # reservations held at once
    check_interval: float = 2.0  # seconds between looks at reachability and the reservations
    read_interval: float = 60.0  # seconds between DHT reads of the relay announcements, once we have enough
    reserve_grace: float = 30.0  # a chosen relay without a reservation for this long is replaced
    avoid_for: float = 300.0  # a replaced relay is not chosen again for this long
    nearer_factor: float = 0.5  # a candidate this much nearer than the farthest relay in use replaces it


class AutoRelay:
    def __init__(self, network: RelayClient, book: RelayBook, read_announcements: Callable[[], Awaitable[None]],
                 rtt: Callable[[str], float | None], measured_rtt: Callable[[str], float | None],
                 config: AutoRelayConfig | None = None):
        self.network = network
        self.book = book
        self.read_announcements = read_announcements  # a DHT read into `book`
        self.rtt = rtt  # measured, else estimated (Vivaldi): orders the candidates
        self.measured_rtt = measured_rtt  # measured only: a relay faking its coordinates moves nothing
        self.config = config or AutoRelayConfig()
        self.chosen: dict[str, float] = {}  # relay id -> when chosen or last seen reserved (monotonic)
        self.avoided: dict[str, float] = {}  # relay id -> until when (monotonic)
        self.moving_to: str | None = None  # a nearer relay reserved on, to replace the farthest one in use
        self.stats = {"chosen": 0, "replaced": 0, "moved_nearer": 0}
        self._last_read = -float("inf")

    def status(self) -> dict:
        held = self.network.relays_held()
        return {
            "active": bool(self.chosen),
            "relays": {r: {"reserved": held[r][0], "error": str(held[r][1]) if held[r][1] else None}
                       for r in self.chosen if r in held},
            "avoided": sorted(self.avoided),
            "candidates": len(self.book.relays()),
            **self.stats,
        }

    async def run(self) -> None:
        while True:
            status = self.network.reachability().get("status")
            if status == "private":
                await self._read_if_due()
                self.step()
            elif status == "public" and self.chosen:
                log.info("reachable directly: dropping the relays chosen while behind NAT")
                for relay_id in list(self.chosen):
                    self.network.drop_relay(relay_id)
                self.chosen.clear()
            await trio.sleep(self.config.check_interval)

    async def _read_if_due(self) -> None:
        now = time.monotonic()
        short = len(self.candidates()) < self.config.want - len(self.chosen) + 1
        if now - self._last_read < (self.config.check_interval * 5 if short else self.config.read_interval):
            return
        self._last_read = now
        try:
            await self.read_announcements()
        except P2PError as e:
            log.info("could not read the relay announcements: %s", e)

    def candidates(self) -> list[RelayAd]:
        """Relays heard of that are neither in use nor avoided, nearest first (unknown RTTs last)."""
        now = time.monotonic()
        for relay_id, until in list(self.avoided.items()):
            if until <= now:
                del self.avoided[relay_id]
        ads = [ad for ad in self.book.relays() if ad.peer_id not in self.chosen and ad.peer_id not in self.avoided]

        def nearness(ad: RelayAd) -> tuple[bool, float]:
            rtt = self.rtt(ad.peer_id)
            return (rtt is None, rtt or 0.0)

        return sorted(ads, key=nearness)

    def step(self) -> None:
        """Replace failed relays, then fill up to `want` from the candidates."""
        now = time.monotonic()
        held = self.network.relays_held()
        for relay_id, since in list(self.chosen.items()):
            live, error = held.get(relay_id, (False, None))
            if live:
                self.chosen[relay_id] = now
                continue
            if error is None and now - since < self.config.reserve_grace:
                continue  # reserving (again): the keeper's first attempt has not failed yet
            log.warning("relay %s: %s; choosing another", relay_id,
                        error or f"no reservation for {self.config.reserve_grace:g} s")
            self.network.drop_relay(relay_id)
            del self.chosen[relay_id]
            self.avoided[relay_id] = now + self.config.avoid_for
            self.stats["replaced"] += 1
        for ad in self.candidates():
            if len(self.chosen) >= self.config.want:
                break
            self._choose(ad, now)
        self._move_nearer(held, now)

    def _own_ips(self) -> list[str]:
        listening = [e[0] for e in map(tcp_endpoint, self.network.direct_addrs()) if e is not None]
        return [*listening, *self.network.confirmed_ips()]

    def _choose(self, ad: RelayAd, now: float) -> str | None:
        addrs = dial_addrs(ad, self._own_ips())
        try:
            if not addrs:
                raise ValueError("it names only addresses we may not dial (this host, its link, a private network)")
            relay_id = self.network.add_relay(addrs[0], also_at=addrs[1:])
        except ValueError as e:  # our own, or an address no relay of ours can have
            log.info("relay %s not usable: %s", ad.peer_id, e)
            self.avoided[ad.peer_id] = now + self.config.avoid_for
            return None
        log.info("behind NAT: reserving on relay %s (%s)", relay_id, ", ".join(addrs))
        self.chosen[relay_id] = now
        self.stats["chosen"] += 1
        return relay_id

    def _move_nearer(self, held: dict, now: float) -> None:
        if self.moving_to is not None:
            if self.moving_to not in self.chosen:  # it failed and was replaced
                self.moving_to = None
            elif held.get(self.moving_to, (False, None))[0]:
                if len(self.chosen) > self.config.want:  # else the one it was to replace failed meanwhile
                    others = {r: self.measured_rtt(r) for r in self.chosen if r != self.moving_to}
                    farthest = max(others, key=lambda r: others[r] or 0.0)
                    log.info("reserved on nearer relay %s; dropping %s", self.moving_to, farthest)
                    self.network.drop_relay(farthest)
                    del self.chosen[farthest]
                    self.stats["moved_nearer"] += 1
                self.moving_to = None
            return
        if len(self.chosen) < self.config.want or not all(held.get(r, (False, None))[0] for r in self.chosen):
            return
        rtts = {r: self.measured_rtt(r) for r in self.chosen}
        if any(rtt is None for rtt in rtts.values()):
            return
        farthest_rtt = max(rtt for rtt in rtts.values() if rtt is not None)
        for ad in self.candidates():
            rtt = self.measured_rtt(ad.peer_id)
            if rtt is not None and rtt < farthest_rtt * self.config.nearer_factor:
                self.moving_to = self._choose(ad, now)
                return  # candidates come nearest first: the first measured one near enough
