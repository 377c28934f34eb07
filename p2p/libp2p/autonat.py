"""Reachability detection (AutoNAT-style): is this peer dialable from the swarm, or behind NAT?

A peer asks a few admitted peers, over `/potluck/autonat/1.0.0` (a request on our gated session, so
private swarms use it too), to dial it back at its candidate addresses: the addresses it listens on
and the IPs peers in two networks observe it at (`identify`). Each asked peer dials, on a NEW
connection, only the candidates whose IP is the one it sees the request come from (never an address
a requester merely names, so a peer cannot aim our dials at a third party), checks with a Noise
handshake that the peer answering there is the requester, closes, and answers which addresses worked. A dial-back is a bare
TCP + Noise socket outside the swarm: neither side ever lists it as a connection (`connected_peers`,
status pages), and it is closed as soon as Noise has answered.

The verdict: `public` when more asked peers reached us than did not, `private` otherwise, `unknown`
until a peer answered. The first check runs as soon as a peer is admitted; it is repeated when our
candidate addresses change, when the verdict is still unknown and new peers are around, and every
`recheck` seconds. A check asks connected peers only: it never re-dials a peer that left meanwhile;
only peers we reach directly (over a relay only a liar answers), and one per network (/24, /48), so
Sybils cannot outvote honest peers by numbers or by relaying.

Serving it is bounded: one request per peer per `AutonatLimits.per_peer_interval`, at most
`max_concurrent` dial-back jobs at once, `max_addrs` addresses dialled per request, each within
`dial_timeout`; over-limit requests are refused at once with `DialBackRefused`, and requests over a
relayed connection too (the relay hides where the requester is), and requests from a loopback,
unspecified, link-local or multicast IP (our own host or link: a local forward or proxy would
otherwise aim our dials at our own local ports), loopback allowed only while we listen on loopback
alone.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Protocol

import multiaddr
import trio
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

from ..errors import P2PError
from ..framing import expect_map
from ..framing import field as frame_field
from ..network import ConnectionListener, RequestHandler
from . import io
from .addresses import may_dial_local
from .gate import GatedHost
from .identify import reporter_network

log = logging.getLogger(__name__)

AUTONAT = "/potluck/autonat/1.0.0"
MAX_CANDIDATES = 16
MAX_ADDR_LEN = 300


class DialBackRefused(P2PError):
    """A peer declined to dial us back now (rate limit, busy, or our connection to it is relayed)."""


@dataclass(frozen=True)
class AutonatLimits:
    """What a peer grants others asking to be dialled back."""

    per_peer_interval: float = 10.0  # one request per peer per this many seconds
    max_concurrent: int = 2  # dial-back jobs at once, all peers together
    max_addrs: int = 4  # addresses dialled per request
    dial_timeout: float = 3.0  # per address: TCP connect and Noise handshake
    max_remembered: int = 1024  # peers whose last request time is kept


@dataclass
class Reachability:
    status: str = "unknown"  # "public", "private" or "unknown"
    reachable_addrs: list[str] = field(default_factory=list)  # addresses a peer dialled us back at
    checked_at: float | None = None  # unix time of the last check that got an answer
    asked: int = 0  # peers asked in that check
    answered: int = 0  # ... that answered

    def as_dict(self) -> dict:
        return {"status": self.status, "reachable_addrs": list(self.reachable_addrs), "checked_at": self.checked_at,
                "asked": self.asked, "answered": self.answered}


class AutonatHost(GatedHost, Protocol):
    """What reachability detection needs of `Libp2pNetwork` besides `GatedHost`."""

    def direct_addrs(self) -> list[str]: ...

    def confirmed_ips(self) -> list[str]: ...

    def connected_peers(self) -> list[str]: ...

    def remote_ip(self, peer_id: str) -> str | None: ...

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    def add_connection_listener(self, listener: ConnectionListener) -> None: ...

    async def request(self, peer_id: str, protocol: str, body: Any, timeout: float = ...) -> Any: ...


def _ip_port(addr: str) -> tuple[str, int] | None:
    """(ip, tcp port) of a plain TCP address (an optional trailing /p2p/<id> aside); None otherwise."""
    try:
        ma = multiaddr.Multiaddr(addr)
        parts = [(p.name, ma.value_for_protocol(p.code)) for p in ma.protocols()]
    except Exception:
        return None
    if len(parts) > 3 or len(parts) < 2 or parts[0][0] not in ("ip4", "ip6") or parts[1][0] != "tcp":
        return None
    if len(parts) == 3 and parts[2][0] != "p2p":
        return None
    try:
        return str(ipaddress.ip_address(parts[0][1])), int(parts[1][1])
    except ValueError:
        return None


class Autonat:
    """Both sides: serves dial-back requests, and keeps `reachability` of this peer up to date."""

    def __init__(self, net: AutonatHost, swarm: Swarm, *, limits: AutonatLimits | None = None, ask: int = 3,
                 recheck: float = 300.0, poll: float = 2.0, answer_timeout: float = 15.0):
        self.net = net
        self.swarm = swarm
        self.limits = limits or AutonatLimits()
        self.ask = ask
        self.recheck = recheck
        self.poll = poll
        self.answer_timeout = answer_timeout
        self.reachability = Reachability()
        self.stats = {"dialbacks_served": 0, "dialbacks_refused": 0, "checks": 0}
        self._asked_by: OrderedDict[str, float] = OrderedDict()
        self._jobs = trio.CapacityLimiter(self.limits.max_concurrent)
        self._peer_joined = trio.Event()
        self._checked_candidates: list[str] | None = None
        self._asked_peers: set[str] = set()
        net.set_request_handler(AUTONAT, self._serve)
        net.add_connection_listener(self._on_peer)

    # --- serving dial-backs ---------------------------------------------------------------------------

    async def _serve(self, peer_id: str, body: Any) -> dict:
        request = expect_map(body, "autonat request")
        addrs = frame_field(request, "addrs", list, max_len=MAX_CANDIDATES)
        now = time.monotonic()
        last = self._asked_by.get(peer_id)
        if last is not None and now - last < self.limits.per_peer_interval:
            self.stats["dialbacks_refused"] += 1
            raise DialBackRefused(f"one dial-back per {self.limits.per_peer_interval:g} s")
        self._asked_by[peer_id] = now
        self._asked_by.move_to_end(peer_id)
        while len(self._asked_by) > self.limits.max_remembered:
            self._asked_by.popitem(last=False)
        ip = self.net.remote_ip(peer_id)
        if ip is None:
            self.stats["dialbacks_refused"] += 1
            raise DialBackRefused("the request came over a relayed connection")
        if not self._may_dial(ip):
            self.stats["dialbacks_refused"] += 1
            raise DialBackRefused("the request came from a local address (a forward or proxy on this host?)")
        targets: list[tuple[str, tuple[str, int]]] = []
        for addr in addrs:
            if not isinstance(addr, str) or len(addr) > MAX_ADDR_LEN:
                continue
            where = _ip_port(addr)
            if where is not None and where[0] == ip and where not in [t for _, t in targets]:
                targets.append((addr, where))
        targets = targets[: self.limits.max_addrs]
        try:
            self._jobs.acquire_nowait()
        except trio.WouldBlock:
            self.stats["dialbacks_refused"] += 1
            raise DialBackRefused("busy with other dial-backs") from None
        try:
            reached: list[str] = []
            failed: list[str] = []

            async def try_one(addr: str, where: tuple[str, int]) -> None:
                (reached if await self._dial_back(peer_id, *where) else failed).append(addr)

            async with trio.open_nursery() as nursery:
                for addr, where in targets:
                    nursery.start_soon(try_one, addr, where)
        finally:
            self._jobs.release()
        self.stats["dialbacks_served"] += 1
        return {"ok": reached, "failed": failed}

    def _may_dial(self, ip: str) -> bool:
        """Whether a requester seen at `ip` may be dialled back there (`may_dial_local`): strangers
        arriving through a local forward or proxy would otherwise aim our dials at our own ports."""
        return may_dial_local(ip, [w[0] for w in (_ip_port(a) for a in self.net.direct_addrs()) if w is not None])

    async def _dial_back(self, peer_id: str, ip: str, port: int) -> bool:
        """Whether `peer_id` answers at ip:port on a new connection (TCP, then Noise proves who it is)."""
        addr = multiaddr.Multiaddr(f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}")
        transport = self.swarm.transport_manager.transport_for_dialing(addr)
        if transport is None:
            return False
        raw = None
        try:
            with trio.fail_after(self.limits.dial_timeout):
                raw = await transport.dial(addr)
                secured = await self.swarm.upgrader.upgrade_security(raw, True, ID.from_base58(peer_id))
            return bool(secured.get_remote_peer() == ID.from_base58(peer_id))
        except trio.Cancelled:
            raise
        except Exception:  # refused, timed out, or someone else answered there
            return False
        finally:
            if raw is not None:
                await io.close(raw)

    # --- detecting our own reachability ---------------------------------------------------------------

    def _on_peer(self, peer_id: str, connected: bool) -> None:
        if connected:
            self._peer_joined.set()

    def candidates(self) -> list[str]:
        """Where others might reach us: the TCP addresses we listen on, and each IP peers see us at
        (`confirmed_ips`: reported from two networks, so one network's Sybils cannot fill our
        candidates) with each port we listen on (what a NAT that forwards or preserves our port
        exposes). The ports peers see our outbound connections come from are not candidates: nothing
        listens there."""
        listening = [w for w in (_ip_port(a) for a in self.net.direct_addrs()) if w is not None]
        seen = [str(ipaddress.ip_address(ip)) for ip in self.net.confirmed_ips()]
        out: list[str] = []
        for ip, port in [*listening, *((ip, port) for ip in seen for _, port in listening)]:
            addr = f"/{'ip6' if ':' in ip else 'ip4'}/{ip}/tcp/{port}"
            if addr not in out:
                out.append(addr)
        return out[:MAX_CANDIDATES]

    async def run(self) -> None:
        """Check when a peer first joins, when our candidate addresses change, while still unknown as
        new peers arrive, and every `recheck` seconds."""
        await self._peer_joined.wait()
        last = -float("inf")
        while True:
            candidates = self.candidates()
            direct = {peer_id for peer_id, _ in self._direct_peers()}
            self._asked_peers &= direct
            fresh = direct - self._asked_peers
            due = (
                time.monotonic() - last >= self.recheck
                or candidates != self._checked_candidates
                or (self.reachability.status == "unknown" and fresh)
            )
            if due and direct:
                await self.check()
                last = time.monotonic()
            await trio.sleep(self.poll)

    def _direct_peers(self) -> list[tuple[str, str]]:
        """(peer id, IP) of each connected peer we reach directly. Over a relay only liars answer
        (honest peers refuse: they cannot see where we are), so relayed peers are never asked."""
        ips = [(peer_id, self.net.remote_ip(peer_id)) for peer_id in self.net.connected_peers()]
        return [(peer_id, ip) for peer_id, ip in ips if ip is not None]

    async def ask_one(self, peer_id: str, candidates: list[str]) -> dict | None:
        """`peer_id`'s answer (the candidates it reached us at, those it did not), or None when it gave
        none. Only while connected: a check never re-dials a peer that left (a request would)."""
        if not self.net.admitted(peer_id):
            return None
        try:
            answer = expect_map(await self.net.request(peer_id, AUTONAT, {"addrs": candidates},
                                                       timeout=self.answer_timeout), "autonat answer")
            ok = frame_field(answer, "ok", list, max_len=MAX_CANDIDATES)
            failed = frame_field(answer, "failed", list, max_len=MAX_CANDIDATES)
        except P2PError as e:  # refused, timed out, gone: this peer says nothing about us
            log.info("autonat: %s gave no answer: %s", peer_id, e)
            return None
        return {"ok": [a for a in ok if a in candidates], "failed": failed}

    async def check(self) -> Reachability:
        """Ask up to `ask` directly connected peers, one per network (`reporter_network`: Sybils in one
        network give one answer), to dial us back; update and return `reachability`."""
        candidates = self.candidates()
        peers = self._direct_peers()
        random.shuffle(peers)
        one_per_network: dict[str, str] = {}
        for peer_id, ip in peers:
            one_per_network.setdefault(reporter_network(ip), peer_id)
        chosen = list(one_per_network.values())[: self.ask]
        answers: list[dict] = []

        async def ask(peer_id: str) -> None:
            answer = await self.ask_one(peer_id, candidates)
            if answer is not None:
                answers.append(answer)

        async with trio.open_nursery() as nursery:
            for peer_id in chosen:
                nursery.start_soon(ask, peer_id)
        self.stats["checks"] += 1
        self._checked_candidates = candidates
        self._asked_peers.update(chosen)
        if answers:
            reached = sum(1 for a in answers if a["ok"])
            status = "public" if reached > len(answers) - reached else "private"
            addrs = sorted({addr for a in answers for addr in a["ok"]})
            if status != self.reachability.status:
                log.info("reachability: %s (%d of %d peers dialled us back)", status, reached, len(answers))
            self.reachability = Reachability(status, addrs, time.time(), len(chosen), len(answers))
        return self.reachability
