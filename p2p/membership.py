"""Who is in the swarm and alive: peer exchange, pings with RTT, dead-peer detection, reconnection.

A small swarm needs no DHT to find itself: each peer says hello to the peers it knows, and the
reply carries the peers the other side knows, so bootstrapping from any one member reaches all of
them. Every known peer is pinged each `ping_interval`; `dead_after` missed pings in a row mark it
dead (a few seconds), after which it is redialled with exponential backoff until it returns or is
forgotten. Three misses, not two: over a lossy link TCP's retransmissions make one slow ping likely
to be followed by another, and a peer wrongly declared dead loses its connection and waits out a
backoff. A redial gets three ping timeouts (a dial costs several round trips). RTTs are smoothed and kept for clustering and routing above.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field as dc_field

import trio

from . import framing
from .errors import BadRequest, P2PError, SwarmKeyMismatch
from .network import Network, protocol_id

log = logging.getLogger(__name__)

HELLO = protocol_id("hello")
PING = protocol_id("ping")

MAX_ADDRS = 8
MAX_ADDR_LEN = 256
MAX_REGION_LEN = 64
MAX_SHARED_PEERS = 64


@dataclass
class PeerState:
    peer_id: str
    addr: str | None = None
    region: str = ""
    rtt: float | None = None  # seconds, smoothed
    alive: bool = False
    last_seen: float | None = None  # trio clock
    missed: int = 0
    retry_at: float = 0.0
    backoff: float = dc_field(default=1.0)
    dead_since: float | None = None

    def as_dict(self) -> dict:
        return {
            "peer_id": self.peer_id,
            "addr": self.addr,
            "region": self.region,
            "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 3),
            "alive": self.alive,
        }


def check_addr(addr: object, peer_id: str | None = None) -> str:
    if not isinstance(addr, str) or not addr.startswith("/") or len(addr) > MAX_ADDR_LEN:
        raise BadRequest("an address is a multiaddr string of at most 256 characters")
    if "/p2p/" not in addr:
        raise BadRequest(f"address {addr[:80]!r} has no /p2p/ peer id")
    if peer_id is not None and addr.rsplit("/p2p/", 1)[1] != peer_id:
        raise BadRequest("address names another peer id than its owner")
    return addr


class Membership:
    def __init__(
        self,
        network: Network,
        *,
        region: str = "",
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        dead_after: int = 3,
        exchange_interval: float = 5.0,
        max_peers: int = 64,
        max_backoff: float = 15.0,
        forget_after: float = 600.0,
    ):
        self.network = network
        self.region = region[:MAX_REGION_LEN]
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.dead_after = dead_after
        self.exchange_interval = exchange_interval
        self.max_peers = max_peers
        self.max_backoff = max_backoff
        self.forget_after = forget_after
        self._peers: dict[str, PeerState] = {}
        self._rng = random.Random()
        network.set_request_handler(HELLO, self._on_hello)
        network.set_request_handler(PING, self._on_ping)

    # --- what the layers above read --------------------------------------------------------------

    def peers(self) -> list[PeerState]:
        return sorted(self._peers.values(), key=lambda p: p.peer_id)

    def alive_peers(self) -> list[PeerState]:
        return [p for p in self.peers() if p.alive]

    def rtt(self, peer_id: str) -> float | None:
        state = self._peers.get(peer_id)
        return state.rtt if state else None

    # --- joining ---------------------------------------------------------------------------------

    async def bootstrap(self, addrs: list[str]) -> int:
        """Say hello to each bootstrap address; returns how many answered. Unanswered ones are retried by `run`.

        Raises SwarmKeyMismatch when every bootstrap peer refused our swarm key: retrying cannot help.
        """
        answered = 0
        refusals: list[SwarmKeyMismatch] = []
        for addr in addrs:
            try:
                peer_id = await self.network.connect(addr)
            except SwarmKeyMismatch as e:
                log.error("bootstrap peer %s refused us: %s", addr, e)
                refusals.append(e)
                continue
            except P2PError as e:
                log.warning("bootstrap peer %s did not answer: %s", addr, e)
                named = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else None
                if named:
                    self.learn(named, addr)
                continue
            self.learn(peer_id, addr)
            if await self._hello(peer_id):
                answered += 1
        if addrs and len(refusals) == len(addrs):
            raise refusals[0]
        return answered

    def learn(self, peer_id: str, addr: str | None, region: str | None = None) -> PeerState | None:
        """Note a peer and where to dial it (from a hello, gossip, or the DHT); it is probed next round."""
        if peer_id == self.network.peer_id:
            return None
        state = self._peers.get(peer_id)
        if state is None:
            if len(self._peers) >= self.max_peers * 4:
                return None
            state = self._peers[peer_id] = PeerState(peer_id)
        if addr and not state.alive:
            state.addr = addr
        if addr:
            self.network.add_address(peer_id, addr)
        if region is not None:
            state.region = region
        return state

    def _hello_body(self) -> dict:
        shared = [
            [p.peer_id, p.addr, p.region] for p in self._peers.values() if p.alive and p.addr
        ][:MAX_SHARED_PEERS]
        return {"addrs": self.network.listen_addrs()[:MAX_ADDRS], "region": self.region, "peers": shared}

    def _absorb(self, peer_id: str, body: object) -> None:
        """Take in a hello (request or reply) from `peer_id`: its addresses, region, and the peers it knows."""
        msg = framing.expect_map(body, "hello")
        addrs = framing.field(msg, "addrs", list, max_len=MAX_ADDRS)
        region = framing.field(msg, "region", str, max_len=MAX_REGION_LEN)
        shared = framing.field(msg, "peers", list, max_len=MAX_SHARED_PEERS)
        own = [check_addr(a, peer_id) for a in addrs]
        learned = []
        for entry in shared:
            if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(x, str) for x in entry)):
                raise BadRequest("each shared peer is [peer_id, addr, region]")
            other_id, addr, other_region = entry
            learned.append((other_id, check_addr(addr, other_id), other_region[:MAX_REGION_LEN]))
        self.learn(peer_id, own[0] if own else None, region)
        for other_id, addr, other_region in learned:
            if other_id not in self._peers:
                self.learn(other_id, addr, other_region)

    async def _on_hello(self, peer_id: str, body: object) -> dict:
        self._absorb(peer_id, body)
        self._mark_alive(peer_id, None)
        return self._hello_body()

    async def _on_ping(self, peer_id: str, body: object) -> dict:
        return {}

    async def _hello(self, peer_id: str) -> bool:
        start = trio.current_time()
        try:
            reply = await self.network.request(peer_id, HELLO, self._hello_body(), timeout=self.ping_timeout * 3)
            self._absorb(peer_id, reply)
        except (P2PError, framing.FrameError) as e:
            log.debug("hello to %s failed: %s", peer_id, e)
            self._mark_missed(peer_id)
            return False
        self._mark_alive(peer_id, trio.current_time() - start)
        return True

    # --- liveness --------------------------------------------------------------------------------

    def _mark_alive(self, peer_id: str, rtt: float | None) -> None:
        state = self._peers.get(peer_id) or self.learn(peer_id, self.network.address_of(peer_id))
        if state is None:
            return
        if not state.alive:
            log.info("peer %s is up (%s)", peer_id, state.addr)
        state.alive = True
        state.missed = 0
        state.backoff = 1.0
        state.dead_since = None
        state.last_seen = trio.current_time()
        if rtt is not None:
            state.rtt = rtt if state.rtt is None else 0.7 * state.rtt + 0.3 * rtt

    def _mark_missed(self, peer_id: str) -> None:
        state = self._peers.get(peer_id)
        if state is None:
            return
        state.missed += 1
        now = trio.current_time()
        if state.alive and state.missed >= self.dead_after:
            log.info("peer %s is dead (%d pings missed)", peer_id, state.missed)
            state.alive = False
            state.dead_since = now
        if not state.alive:
            if state.dead_since is None:
                state.dead_since = now
            state.retry_at = now + state.backoff
            state.backoff = min(state.backoff * 2, self.max_backoff)

    async def _probe(self, state: PeerState) -> None:
        if not state.alive and (state.last_seen is None or state.missed == 0):
            # Never (or no longer) greeted: a hello also brings its peer list.
            await self._hello(state.peer_id)
            return
        start = trio.current_time()
        timeout = self.ping_timeout if state.alive else self.ping_timeout * 3
        try:
            await self.network.request(state.peer_id, PING, {}, timeout=timeout)
        except P2PError:
            was_alive = state.alive
            self._mark_missed(state.peer_id)
            if was_alive and not state.alive:
                # A connection that outlived a network cut sits in TCP's retransmission backoff
                # (tens of seconds); drop it so the next probe dials afresh.
                await self.network.disconnect(state.peer_id)
            return
        was_alive = state.alive
        self._mark_alive(state.peer_id, trio.current_time() - start)
        if not was_alive:
            await self._hello(state.peer_id)

    async def _ping_round(self) -> None:
        now = trio.current_time()
        due = []
        for state in list(self._peers.values()):
            if state.alive or now >= state.retry_at:
                due.append(state)
            elif state.dead_since is not None and now - state.dead_since > self.forget_after:
                del self._peers[state.peer_id]
        async with trio.open_nursery() as nursery:
            for state in due:
                nursery.start_soon(self._probe, state)

    async def _exchange(self) -> None:
        alive = self.alive_peers()
        if alive:
            await self._hello(self._rng.choice(alive).peer_id)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        next_exchange = trio.current_time() + self.exchange_interval
        while True:
            await self._ping_round()
            if trio.current_time() >= next_exchange:
                await self._exchange()
                next_exchange = trio.current_time() + self.exchange_interval
            await trio.sleep(self.ping_interval)
