"""Hole punching (DCUtR, libp2p's `/libp2p/dcutr`): two peers that met over a relay connect directly.

When a peer accepts a session over a relayed connection (`relay`: it is the NATed target of a
circuit), it starts the exchange on that connection, as the spec's initiator B:

    B -> A  CONNECT {our addresses}          (B starts a timer)
    A -> B  CONNECT {A's addresses}          (B: RTT = the timer)
    B -> A  SYNC                             A dials B at once; B dials A after RTT/2

Both dial from the port they listen on (py-libp2p's TCP listener and `Swarm.dial_addr(…, source)`
set SO_REUSEADDR/SO_REUSEPORT), so each NAT maps the dial to the address the other side was told,
and the two SYNs cross: a TCP simultaneous open, or one side's SYN reaching the other's listener
through a full-cone NAT. Either way there is one TCP connection, and the security handshake's roles
are fixed by the spec: A (the circuit's dialer) is the Noise initiator, B upgrades its dial as the
responder (`Swarm.dial_addr_as_responder`). Up to `ROUNDS` rounds are tried, and B starts up to
`ATTEMPTS` exchanges for one relayed session while it stays relayed.

The addresses we announce are the IPs admitted peers in two networks observe us at (`identify`'s
`ObservedAddrs`, fed by identify in open swarms and by the gate handshake in every swarm, so private
swarms hole punch too; the most reported observation while none is confirmed), with the port we
listen on: a port-preserving NAT (endpoint-independent mapping) maps our listen port to the same port
outside. A symmetric NAT maps each destination to another port, so there it fails and the peers stay
on the relay.

On success A opens a new session on the direct connection (the gate handshake runs again there);
both sides' new requests use the newest session, and A closes the relayed session and connection
once no request is in flight on it and no other stream uses it (at most `RETIRE_GRACE` s later), so
a generation in progress finishes on the relay.

Hostile input: served only to admitted peers over a relayed connection (in a private swarm, only
members: an outsider's stream is reset), one exchange per peer at a time; each message is at most
`MAX_MESSAGE` bytes (the spec's 4 KiB) with at most `MAX_ADDRS` addresses, each a plain
/ip4|ip6/…/tcp/… address, and every step is bounded by `timeout`. A
stranger with a relayed connection names the addresses we dial, so we dial only those
`addresses.may_dial` allows (never this host or its link; a private range only when we are in one
ourselves), at most 8 a round, each once a round (no swarm retries).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, Protocol, Sequence

import multiaddr
import trio
from google.protobuf.message import DecodeError
from libp2p.custom_types import TProtocol
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch as HolePunchMessage
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from libp2p.utils.varint import read_varint_prefixed_bytes_limited

from ..errors import P2PError, PeerUnreachable
from . import io
from .addresses import may_dial
from .gate import GatedHost

log = logging.getLogger(__name__)

DCUTR_PROTOCOL = TProtocol("/libp2p/dcutr")
MAX_MESSAGE = 4096  # the spec's bound on one message
MAX_ADDRS = 16  # addresses taken from one CONNECT (more are ignored)
ROUNDS = 3
ROUND_TIMEOUT = 5.0
# Exchanges we (B) start for one relayed session, RETRY_AFTER × n apart, while it stays relayed: the
# spec's retries. A peer that just connected may not know its observed address yet, and a punch under
# load can miss its moment; a symmetric NAT fails every one, at a bounded cost.
ATTEMPTS = 3
RETRY_AFTER = 2.0
RETIRE_GRACE = 120.0  # the longest a relayed session is kept for requests in flight on it
RETIRE_QUIET = 1.0  # it must carry nothing for this long first


class RequestSessionLike(Protocol):
    """What retiring a relayed session needs of `session.RequestSession`."""

    raw: Any
    pending: dict
    inbound: dict
    closed: bool

    async def close(self, reason: str = "closed") -> None: ...


class HolePunchHost(GatedHost, Protocol):
    """What hole punching needs of `Libp2pNetwork` besides `GatedHost`."""

    @property
    def closing(self) -> bool: ...

    def is_relayed(self, muxed_conn: Any) -> bool: ...

    def observed_addrs(self) -> list[tuple[str, int]]: ...

    def confirmed_ips(self) -> list[str]: ...

    def direct_addrs(self) -> list[str]: ...

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None: ...

    async def open_session(self, peer_id: str) -> RequestSessionLike:
        """A new request session with an admitted peer, on its best connection (direct before relayed)."""

    def sessions_on(self, peer_id: str, muxed_conn: Any) -> Sequence[RequestSessionLike]: ...


def _tcp_endpoint(addr: multiaddr.Multiaddr) -> tuple[str, int] | None:
    """(ip, port) of a plain /ip4|ip6/<ip>/tcp/<port>[/p2p/<id>] address; None for anything else."""
    parts = [(proto.name, value) for proto, value in addr.items()]
    if parts and parts[-1][0] == "p2p":
        parts = parts[:-1]
    if len(parts) != 2 or parts[0][0] not in ("ip4", "ip6") or parts[1][0] != "tcp":
        return None
    return parts[0][1], int(parts[1][1])


def decode_addrs(raw: list[bytes]) -> list[tuple[str, int]]:
    """The dialable TCP endpoints in a CONNECT's ObsAddrs: at most MAX_ADDRS, malformed ones skipped."""
    endpoints: list[tuple[str, int]] = []
    for item in raw[:MAX_ADDRS]:
        try:
            endpoint = _tcp_endpoint(multiaddr.Multiaddr(item))
        except Exception:  # multiaddr raises several unrelated types on bad bytes
            continue
        if endpoint is not None and 0 < endpoint[1] < 65536 and endpoint not in endpoints:
            endpoints.append(endpoint)
    return endpoints


class HolePunchFailed(PeerUnreachable):
    """The peers stay on the relay: no address to punch, the exchange broke off, or no dial got through."""


class HolePunch:
    """DCUtR for one `Libp2pNetwork`: the initiator (on sessions accepted over a relay) and the handler."""

    def __init__(self, net: HolePunchHost, swarm: Swarm, *, enabled: bool, timeout: float = 10.0,
                 observed_wait: float = 3.0):
        self.net = net
        self.swarm = swarm
        self.enabled = enabled
        self.timeout = timeout
        self.observed_wait = observed_wait
        self._busy: set[str] = set()
        self.stats = {"attempts": 0, "direct": 0, "failed": 0}
        if enabled:
            net.host.set_stream_handler(DCUTR_PROTOCOL, self._on_dcutr)

    # --- addresses ----------------------------------------------------------------------------------

    def _listen_endpoint(self) -> tuple[str, int] | None:
        for addr in self.net.direct_addrs():
            endpoint = _tcp_endpoint(multiaddr.Multiaddr(addr))
            if endpoint is not None:
                return endpoint
        return None

    def _own_ips(self) -> list[str]:
        """The IPs we listen on and those peers in two networks see us at."""
        listening = [e[0] for e in (_tcp_endpoint(multiaddr.Multiaddr(a)) for a in self.net.direct_addrs()) if e]
        return [*listening, *self.net.confirmed_ips()]

    async def _our_addrs(self) -> list[bytes]:
        """The IPs peers in two networks see us at (`confirmed_ips`), with our listen port; while none
        is confirmed, the most reported observation alone (one network's reporters cannot add more).
        Waits up to observed_wait for a first observation."""
        listen = self._listen_endpoint()
        if listen is None:
            return []
        with trio.move_on_after(self.observed_wait):
            while not self.net.observed_addrs():
                await trio.sleep(0.05)
        ips = self.net.confirmed_ips()
        if not ips:
            top = [_tcp_endpoint(multiaddr.Multiaddr(addr)) for addr, _ in self.net.observed_addrs()[:1]]
            ips = [endpoint[0] for endpoint in top if endpoint is not None]
        out: list[bytes] = []
        for ip in ips:
            proto = "ip6" if ":" in ip else "ip4"
            candidate = multiaddr.Multiaddr(f"/{proto}/{ip}/tcp/{listen[1]}").to_bytes()
            if candidate not in out:
                out.append(candidate)
        return out[:MAX_ADDRS]

    # --- the exchange -------------------------------------------------------------------------------

    def relayed_session_accepted(self, peer_id: str) -> None:
        """A peer reached us over a relay: try to move to a direct connection (we are DCUtR's B)."""
        if self.enabled and peer_id not in self._busy:
            self._busy.add(peer_id)
            self.net.spawn(self._initiate, peer_id)

    async def _read(self, stream: Any, want: int) -> HolePunchMessage:
        try:
            data = await read_varint_prefixed_bytes_limited(stream, MAX_MESSAGE)
            msg = HolePunchMessage()
            msg.ParseFromString(data)
        except (DecodeError, ValueError) as e:
            raise HolePunchFailed(f"malformed DCUtR message: {type(e).__name__}") from None
        except Exception as e:  # the stream's read errors (reset, EOF) have no common type
            raise HolePunchFailed(f"DCUtR stream broke: {type(e).__name__}: {e}"[:300]) from None
        if msg.type != want:
            raise HolePunchFailed(f"expected DCUtR message type {want}, got {msg.type}")
        return msg

    async def _write(self, stream: Any, msg: HolePunchMessage) -> None:
        try:
            await write_delimited_msg(stream, msg)
        except Exception as e:
            raise HolePunchFailed(f"DCUtR stream broke: {type(e).__name__}: {e}"[:300]) from None

    async def _initiate(self, peer_id: str) -> None:
        try:
            for attempt in range(ATTEMPTS):
                if attempt:
                    await trio.sleep(RETRY_AFTER * attempt)
                    if self.net.closing or self._relayed_conn(peer_id) is None or self._direct_conn(peer_id) is not None:
                        return
                if await self._attempt(peer_id):
                    return
        finally:
            self._busy.discard(peer_id)

    async def _attempt(self, peer_id: str) -> bool:
        """One DCUtR exchange and punch as B: whether it ended on a direct connection."""
        self.stats["attempts"] += 1
        stream = None
        try:
            relayed = self._relayed_conn(peer_id)
            ours = await self._our_addrs()
            if relayed is None or not ours:
                raise HolePunchFailed("no relayed connection" if relayed is None else "no observed address yet")
            with trio.fail_after(self.timeout):
                stream = await self.net.host.new_stream(ID.from_base58(peer_id), [DCUTR_PROTOCOL])
                started = time.monotonic()
                await self._write(stream, HolePunchMessage(type=HolePunchMessage.CONNECT, ObsAddrs=ours))
                theirs = decode_addrs(list((await self._read(stream, HolePunchMessage.CONNECT)).ObsAddrs))
                rtt = time.monotonic() - started
                await self._write(stream, HolePunchMessage(type=HolePunchMessage.SYNC))
            await io.close(stream)
            await trio.sleep(rtt / 2)
            await self._punch(peer_id, theirs, as_noise_initiator=False)
            self.stats["direct"] += 1
            log.info("hole punch to %s: direct connection (relay RTT %.0f ms)", peer_id, rtt * 1000)
            return True
        except (P2PError, trio.TooSlowError) as e:
            self.stats["failed"] += 1
            log.info("hole punch to %s failed; on the relay for now: %s", peer_id, e or "timed out")
        except Exception as e:  # new_stream's errors have no common type; never take the nursery down
            self.stats["failed"] += 1
            log.info("hole punch to %s failed; on the relay for now: %s: %s", peer_id, type(e).__name__, e)
        if stream is not None:
            await io.reset(stream)
        return False

    async def _on_dcutr(self, stream: Any) -> None:
        """DCUtR's A: answer CONNECT with our addresses, dial on SYNC, then move our session."""
        peer_id = stream.muxed_conn.peer_id.to_base58()
        if (not self.net.admitted(peer_id) or not self.net.is_relayed(stream.muxed_conn)
                or peer_id in self._busy):
            log.info("refused a DCUtR stream from %s", peer_id)
            await io.reset(stream)
            return
        self._busy.add(peer_id)
        self.stats["attempts"] += 1
        try:
            with trio.fail_after(self.timeout):
                theirs = decode_addrs(list((await self._read(stream, HolePunchMessage.CONNECT)).ObsAddrs))
                ours = await self._our_addrs()
                await self._write(stream, HolePunchMessage(type=HolePunchMessage.CONNECT, ObsAddrs=ours))
                await self._read(stream, HolePunchMessage.SYNC)
            await io.close(stream)
            await self._punch(peer_id, theirs, as_noise_initiator=True)
            await self._move_session(peer_id, stream.muxed_conn)
            self.stats["direct"] += 1
            log.info("hole punch from %s: direct connection", peer_id)
        except (P2PError, trio.TooSlowError) as e:
            self.stats["failed"] += 1
            log.info("hole punch with %s failed; staying on the relay: %s", peer_id, e or "timed out")
            await io.reset(stream)
        finally:
            self._busy.discard(peer_id)

    # --- dialing ------------------------------------------------------------------------------------

    def _relayed_conn(self, peer_id: str) -> Any | None:
        for conn in self.swarm.get_connections(ID.from_base58(peer_id)):
            if self.net.is_relayed(conn.muxed_conn) and not conn.is_closed:
                return conn
        return None

    def _direct_conn(self, peer_id: str) -> Any | None:
        for conn in self.swarm.get_connections(ID.from_base58(peer_id)):
            if not self.net.is_relayed(conn.muxed_conn) and not conn.is_closed:
                return conn
        return None

    async def _punch(self, peer_id: str, endpoints: list[tuple[str, int]], *, as_noise_initiator: bool) -> None:
        """Dial every endpoint from our listen port, up to ROUNDS rounds, until a direct connection exists."""
        source = self._listen_endpoint()
        if source is None:
            raise HolePunchFailed("we listen on no TCP port")
        ours = self._own_ips()
        endpoints = [e for e in endpoints if may_dial(e[0], ours)][:8]
        if not endpoints:
            raise HolePunchFailed("the peer announced no address we may dial")
        pid = ID.from_base58(peer_id)

        async def dial(endpoint: tuple[str, int]) -> None:
            proto = "ip6" if ":" in endpoint[0] else "ip4"
            addr = multiaddr.Multiaddr(f"/{proto}/{endpoint[0]}/tcp/{endpoint[1]}/p2p/{peer_id}")
            try:
                if as_noise_initiator:
                    # One attempt: the rounds are our retries (dial_addr would retry each dial).
                    await self.swarm._dial_addr_single_attempt(addr, pid, source)
                else:
                    await self.swarm.dial_addr_as_responder(addr, pid, source)
            except trio.Cancelled:
                raise
            except Exception as e:  # one failed dial of several says little; the round decides
                log.debug("hole punch dial to %s failed: %s: %s", addr, type(e).__name__, e)

        for round_ in range(ROUNDS):
            if round_:
                await trio.sleep(1.0)
            dialling = [len(endpoints)]

            async def dial_once(endpoint: tuple[str, int]) -> None:
                try:
                    await dial(endpoint)
                finally:
                    dialling[0] -= 1

            async with trio.open_nursery() as nursery:
                for endpoint in endpoints:
                    nursery.start_soon(dial_once, endpoint)
                with trio.move_on_after(ROUND_TIMEOUT):  # a round ends early once all its dials failed
                    while self._direct_conn(peer_id) is None and dialling[0]:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            if self._direct_conn(peer_id) is not None:
                return
        raise HolePunchFailed(f"no direct connection to {peer_id} after {ROUNDS} rounds")

    # --- moving the session -------------------------------------------------------------------------

    async def _move_session(self, peer_id: str, relayed_muxed: Any) -> None:
        """Open a session on the direct connection, then retire the relayed one in the background."""
        direct = self._direct_conn(peer_id)
        try:
            session = await self.net.open_session(peer_id)
        except BaseException:
            if direct is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                    await direct.close()
            raise
        if self.net.is_relayed(session.raw.muxed_conn):
            await session.close("opened on the relayed connection")
            raise HolePunchFailed("the new session went over the relay, not the direct connection")
        self.net.spawn(self._retire, peer_id, relayed_muxed)

    async def _retire(self, peer_id: str, relayed_muxed: Any) -> None:
        """Close the relayed sessions and connection once nothing uses them (bounded by RETIRE_GRACE)."""
        conn = next((c for c in self.swarm.get_connections(ID.from_base58(peer_id))
                     if c.muxed_conn is relayed_muxed), None)
        if conn is None:
            return
        old = self.net.sessions_on(peer_id, relayed_muxed)
        session_streams = {id(s.raw) for s in old}

        def idle() -> bool:
            busy_sessions = any(s.pending or s.inbound for s in old if not s.closed)
            others = [s for s in conn.get_streams() if id(s) not in session_streams]
            return not busy_sessions and not others

        with trio.move_on_after(RETIRE_GRACE):
            quiet_since = None
            while not conn.is_closed:
                if idle():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since >= RETIRE_QUIET:
                        break
                else:
                    quiet_since = None
                await trio.sleep(0.1)
        for s in old:
            await s.close("moved to a direct connection")
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await conn.close()
            except Exception:  # closing a connection the relay already dropped
                pass
