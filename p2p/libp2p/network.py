"""`Libp2pNetwork`: the real-socket backend of `p2p.network.Network`, a py-libp2p host with TCP +
Noise + yamux.

What travels on a connection
----------------------------
Our own traffic uses ONE libp2p protocol id, `/potluck/1.0.0`. Open swarms also serve libp2p's
identify, identify-push and ping (`identify`), so other libp2p nodes can identify and ping us, and we
identify each admitted peer to learn the address it sees us at (`observed_addrs`), and push identify
to connected peers when our addresses change (a relay reservation made or lost). A private swarm
registers `/potluck/1.0.0` and hole punching's `/libp2p/dcutr` (served to admitted peers only), no
identify: an outsider learns neither our addresses nor our protocol list; its members learn where
they are seen from the gate handshake, which tells each side where the other sees it (`gate`).
Every `/potluck/1.0.0` stream starts with one of two frames (`p2p.framing`):

- `{"t": "hello", ...}` opens a request session (`session`) after the gate handshake (`gate`);
- `{"t": "open", "p": "/potluck/NAME/x.y.z"}` opens a long-lived message stream (`open_stream`,
  `stream`); the acceptor answers `{"t": "ok"}` or `{"t": "refuse", "e": kind, "m": why}`.

The inner protocol name travels inside our frames, so an outsider that lists libp2p protocols
learns only that this is a potluck peer. Streams are served only to peers that completed the
session handshake ("admitted" peers); anything else is reset, and a connection whose peer is not
admitted within the gate timeout is closed.

Relaying (peers behind NAT) is `relay`: circuit relay v2, whose two libp2p protocols are registered
only where asked for (`relay_service=True`: `/libp2p/circuit/relay/0.2.0/hop`; `relays=[...]` or
`add_relay`: `/libp2p/circuit/relay/0.2.0/stop`), and which serves only admitted peers. A circuit address
`<relay>/p2p/R/p2p-circuit/p2p/T` names peer T (the last /p2p/); dialing it first makes a libp2p
connection to T through R, then runs the session handshake on it as on any other.

Peers that met over a relay try to connect directly (`holepunch`, DCUtR) and move their sessions
there; the relayed connection closes once nothing uses it.

Reachability (`autonat`): once peers are admitted, a few of them are asked to dial us back on new
connections, at our listening addresses and at each IP they see us at; `reachability()` says whether
that worked (public), did not (private: behind NAT), or is not known yet.

Hostile input
-------------
Every frame's length is checked before its body is read, bodies must arrive within `frame_timeout`
once announced, and every frame is decoded strictly and shape-checked, into at most
`max_frame_objects` objects (frames over 256 KiB in a worker thread: `io.FrameDecoder`). A malformed
frame on a session stream drops that peer (with a logged reason and a best-effort goodbye frame);
other peers are unaffected. Inbound requests in flight are bounded per peer in count and in what they
decode into (`session`). Inbound connections not admitted yet are bounded per remote IP address, and
must finish their Noise + yamux upgrade within a deadline (`patches.InboundLimits`), so idle sockets
from one address cannot take the swarm's inbound slots from everyone else. The addresses we are
given to dial, and py-libp2p's peerstore they end up in, hold at most `max_known_peers` peers
(`book`): a stranger announcing thousands of peers costs dials, not memory.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import multiaddr
import trio

from libp2p import new_swarm
from libp2p.abc import IHost, INotifee
from libp2p.crypto import ed25519 as _ed25519
from libp2p.crypto import x25519 as _x25519
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost, _IdentifyNotifee
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from .. import framing
from ..errors import (
    FrameError,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
    StreamClosed,
)
from ..framing import ExactReader, expect_map, field
from ..identity import Identity
from ..network import (
    DEFAULT_REQUEST_TIMEOUT,
    MAX_REMOTE_ERROR_LEN,
    ConnectionListener,
    Network,
    RequestHandler,
    Stream,
    StreamHandler,
)
from . import gate, io, pace, patches
from .addresses import (DialVerdicts, announce_order, expand_unspecified, full_addr, interface_ips, split_circuit,
                        tcp_endpoint)
from .autonat import Autonat, AutonatLimits
from .book import AddressBook
from .holepunch import HolePunch
from .identify import IdentifyService, PeerRecord
from .relay import CircuitRelay, RelayLimits
from .session import MAX_PROTOCOL_LEN, RequestSession
from .stream import FlowControlledStream

log = logging.getLogger(__name__)

LIBP2P_PROTOCOL = TProtocol("/potluck/1.0.0")


def _unwrap_group(exc: BaseException) -> BaseException:
    """The single leaf of nested ExceptionGroups (host.run() nests them), or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class _Notifee(INotifee):
    def __init__(self, net: "Libp2pNetwork"):
        self.net = net

    async def connected(self, network: Any, conn: Any) -> None:
        self.net._on_connection(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        self.net._on_disconnection(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


class Libp2pNetwork(Network):
    """`Network` over py-libp2p. Create with `async with Libp2pNetwork.open(identity, ...) as net:`."""

    def __init__(
        self,
        identity: Identity,
        swarm_key: bytes | None = None,
        *,
        max_frame: int = framing.DEFAULT_MAX_FRAME,
        gate_timeout: float = 2.0,
        hello_timeout: float = 5.0,
        frame_timeout: float = 30.0,
        max_frame_objects: int = framing.DEFAULT_MAX_OBJECTS,
        max_inflight_in: int = 64,
        max_inflight_bytes_in: int = 64 * 1024 * 1024,
        max_inflight_out: int = 64,
        max_streams_in: int = 64,
        request_rate: float = pace.DEFAULT_RATE,
        request_burst: int = pace.DEFAULT_BURST,
        stream_window: int = 4 * 1024 * 1024,
        linger: float = 10.0,
        relay_service: bool = False,
        relays: list[str] | None = None,
        relay_limits: RelayLimits | None = None,
        relay_timeout: float = 10.0,
        inbound_limits: patches.InboundLimits = patches.InboundLimits(),
        autonat_limits: AutonatLimits | None = None,
        reachability_recheck: float = 300.0,
        max_known_peers: int = 4096,
        hole_punch: bool = True,
    ):
        if swarm_key is not None and (not isinstance(swarm_key, bytes) or len(swarm_key) < 16):
            raise ValueError("a swarm key is at least 16 bytes (load it with p2p.swarm_key.load_key)")
        self.identity = identity
        self.swarm_key = swarm_key
        self.max_frame = max_frame
        self.gate_timeout = gate_timeout if swarm_key is not None else hello_timeout
        self.frame_timeout = frame_timeout
        self.decoder = io.FrameDecoder(max_frame_objects)
        self.max_inflight_in = max_inflight_in
        self.max_inflight_bytes_in = max_inflight_bytes_in
        self.max_inflight_out = max_inflight_out
        self.max_streams_in = max_streams_in
        self.pace = pace.RequestPace(request_rate, request_burst, time.monotonic)
        self.stream_window = stream_window
        self.linger = linger
        self._request_handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._listeners: list[ConnectionListener] = []
        self._sessions: dict[str, list[RequestSession]] = {}
        self._streams_in: dict[str, int] = {}
        # one dial at a time per (peer, address); another address of the same peer may race it
        # (pipeline/hop.py `connect_announced`: the first to reach the peer wins)
        self._dial_locks: dict[tuple[str, str], trio.Lock] = {}
        self._implicit_dials: dict[str, tuple[trio.Event, list[BaseException]]] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._listen_ips: list[str] = []  # of `direct_addrs()`, fixed once listening (see `may_dial`)
        self._dial_verdicts = DialVerdicts()

        key_pair = _ed25519.create_new_key_pair(identity.seed)
        self._libp2p_id = ID.from_pubkey(key_pair.public_key)
        if self._libp2p_id.to_base58() != identity.peer_id:
            raise RuntimeError("libp2p derived a different peer id from our key")
        noise = NoiseTransport(key_pair, noise_privkey=_x25519.create_new_key_pair().private_key)
        swarm = new_swarm(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
            connection_config=ConnectionConfig(dial_timeout=5.0),
            # One quick retry: callers (membership, routing) have their own retry and backoff policy.
            retry_config=RetryConfig(max_retries=1, initial_delay=0.05),
        )
        assert isinstance(swarm, Swarm)  # typed as the interface; we use the Swarm's own parts

        # The auto-connector re-dials peers it finds in the peerstore when below a watermark of 100
        # connections; we decide whom to dial (and must not re-dial peers we dropped).
        async def _no_auto_connect() -> None:
            return None

        swarm.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[method-assign]
        patches.limit_inbound(swarm, inbound_limits)
        self._host = BasicHost(swarm, default_protocols=OrderedDict([(LIBP2P_PROTOCOL, self._on_libp2p_stream)]))
        # BasicHost runs identify against every new connection (admitted or not) and pushes identify
        # to every peer; we identify admitted peers only, and push when our addresses change (`identify`).
        swarm.notifees = [n for n in swarm.notifees if not isinstance(n, _IdentifyNotifee)]
        self._host._schedule_identify = lambda *args, **kwargs: None  # type: ignore[method-assign]
        swarm.register_notifee(_Notifee(self))
        self._swarm = swarm
        self._book = AddressBook(swarm, max_known_peers)
        # Circuit relay v2 (`relay`): dialing circuit addresses always works; the relay service and
        # reservations on relays only when asked for (each registers one more libp2p protocol).
        self._relay = CircuitRelay(self, service=relay_service, relays=relays, limits=relay_limits,
                                   timeout=relay_timeout)
        self.relay_dial_timeout = max(15.0, relay_timeout)
        self._identify = IdentifyService(self, serve=swarm_key is None)
        self._autonat = Autonat(self, swarm, limits=autonat_limits, recheck=reachability_recheck)
        self._holepunch = HolePunch(self, swarm, enabled=hole_punch)

    # --- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        identity: Identity,
        listen_addrs: list[str] | None = None,
        swarm_key: bytes | None = None,
        **options: Any,
    ) -> AsyncIterator["Libp2pNetwork"]:
        """Start listening; everything is closed when the block exits.

        Relaying (see `p2p.libp2p.relay`), as keyword options:
        - `relay_service=True`: serve circuit relay v2 to admitted peers: a publicly reachable member
          lets members behind NAT reserve a slot and be dialled through it.
        - `relays=[multiaddr, ...]`: this peer is behind NAT: reserve a slot on each of these relay
          services (kept refreshed, re-made after the relay's connection drops) and announce
          `<relay addr>/p2p-circuit/p2p/<our id>` first in `listen_addrs()`. `open` waits up to
          `relay_timeout` (10 s) for the first reservations; it raises `SwarmKeyMismatch` or
          `p2p.libp2p.RelayRefused` when every relay refused us, and otherwise keeps retrying the
          missing ones in the background.
        Relays can also be added and dropped while the network runs (`add_relay`, `drop_relay`; the
        choice is the caller's, e.g. potluck's `autorelay`).
        - `relay_limits=p2p.libp2p.RelayLimits(...)`: what a relay service grants.
        """
        patches.apply()
        addrs = [multiaddr.Multiaddr(a) for a in (listen_addrs or ["/ip4/127.0.0.1/tcp/0"])]
        net = cls(identity, swarm_key, **options)
        try:
            async with trio.open_nursery() as nursery:
                net._nursery = nursery
                try:
                    async with net._host.run(listen_addrs=addrs):
                        try:
                            await net._relay.start(nursery)
                            nursery.start_soon(net._autonat.run)
                            if net._identify.serve:
                                nursery.start_soon(net._identify.push_on_change)
                            yield net
                        finally:
                            net._closing = True
                            await net._shutdown()
                finally:
                    # Cancel our tasks only after the host has stopped: cancelling them while the
                    # host unwinds would replace the caller's exception with Cancelled.
                    net._closing = True
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            leaf = _unwrap_group(group)
            if leaf is group:
                raise
            raise leaf from None

    async def _shutdown(self) -> None:
        """Close sessions, listeners and connections ourselves, concurrently and within 2.5 s.

        py-libp2p 0.8.1 does not: when `host.run()` exits, the swarm's cleanup runs in an already
        cancelled scope, stops at its first await, and leaves the listening socket open (a later
        peer on the same port, bound with SO_REUSEPORT, then gets half of the incoming dials sent
        to a dead socket). Its own `close()` closes connections one by one with fixed sleeps of
        0.2 s each.
        """
        swarm = self._swarm
        with trio.CancelScope(shield=True), trio.move_on_after(2.5):
            with trio.move_on_after(0.5):
                for sessions in list(self._sessions.values()):
                    for s in list(sessions):
                        s.finish("network shutting down")
            for listener in list(swarm.listeners.values()):
                with trio.move_on_after(0.5):
                    try:
                        await listener.close()
                    except Exception:
                        pass
                for sock_listener in list(getattr(listener, "listeners", ())):
                    try:
                        sock_listener.socket.close()  # whatever close() left open
                    except Exception:
                        pass

            async def close_conn(conn: Any) -> None:
                try:
                    await conn.close()
                except Exception:
                    pass

            async with trio.open_nursery() as nursery:
                for conns in list(swarm.connections.values()):
                    for conn in list(conns):
                        nursery.start_soon(close_conn, conn)

    # --- for the package's parts: sessions, streams and the relay (their Protocols) -------------------

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run `fn(*args)` in the network's nursery; nothing once the network is closing."""
        if self._nursery is not None and not self._closing:
            self._nursery.start_soon(fn, *args)

    @property
    def host(self) -> IHost:
        return self._host

    @property
    def closing(self) -> bool:
        return self._closing

    def admitted(self, peer_id: str) -> bool:
        """Whether the peer holds a session with us (it passed the gate)."""
        return self._session(peer_id) is not None

    def request_handler(self, protocol: str) -> RequestHandler | None:
        return self._request_handlers.get(protocol)

    # --- addresses and connections ------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Our addresses through relays we hold a reservation on (first: behind NAT they are the ones
        others can dial), then the addresses we listen on."""
        return [*self._relay.circuit_addrs(), *self.direct_addrs()]

    def advertised_addrs(self) -> list[str]:
        """What identify tells peers: `listen_addrs()`, then the addresses peers dialled us back at
        that we do not listen on (a NAT's forwarded port; `reachability`)."""
        listen = self.listen_addrs()
        listed = {a.rsplit("/p2p/", 1)[0] for a in listen}
        return [*listen, *(a for a in self._autonat.reachability.reachable_addrs if a not in listed)]

    def announce_addrs(self) -> list[str]:
        """`listen_addrs()` in the order a peer elsewhere should try them (`addresses.announce_order`:
        internet-routable direct ones, then circuits, then a LAN's or this host's)."""
        return announce_order(self.direct_addrs(), self._relay.circuit_addrs())

    def may_dial(self, addr: str) -> bool:
        """`addresses.may_dial_addr` given the IPs we listen on and peers in two networks see us at (as
        hole punching and autorelay judge theirs)."""
        return self._dial_verdicts.may_dial(addr, [*self.listen_ips(), *self.confirmed_ips()])

    def listen_ips(self) -> list[str]:
        """The IPs of `direct_addrs()`, read once: the listeners do not change after `open`, and parsing
        them costs more than a dial verdict."""
        if not self._listen_ips:
            self._listen_ips = [e[0] for e in map(tcp_endpoint, self.direct_addrs()) if e is not None]
        return self._listen_ips

    def direct_addrs(self) -> list[str]:
        """The addresses we listen on (with /p2p/<id>), without circuit addresses; a listener on 0.0.0.0
        or :: as one address per IP of this host's interfaces (`addresses.expand_unspecified`)."""
        if self._closing:  # the listeners are being closed (a closed one has no address to read)
            return []
        addrs = [str(a) for a in self._host.get_addrs()]
        if not any(a.startswith(("/ip4/0.0.0.0/", "/ip6/::/")) for a in addrs):
            return addrs
        ips = interface_ips()
        return list(dict.fromkeys(x for a in addrs for x in expand_unspecified(a, ips)))

    def observed_addrs(self) -> list[tuple[str, int]]:
        """Our addresses as admitted peers see them (their gate handshake and identify), each with how
        many reporting networks (/24, /48) report it, most reported first."""
        return self._identify.observed.addrs()

    def confirmed_ips(self) -> list[str]:
        """The IPs we believe we are observed at: reported from at least two networks."""
        return self._identify.observed.confirmed_ips()

    def identified(self, peer_id: str) -> PeerRecord | None:
        """What an admitted peer said about itself in identify, once it answered."""
        return self._identify.records.get(peer_id)

    def is_relayed(self, muxed_conn: Any) -> bool:
        return self._relay.is_relayed(muxed_conn)

    def remote_ip(self, peer_id: str) -> str | None:
        """The IP address an admitted peer's session comes from; None over a relay (or not admitted)."""
        session = self._session(peer_id)
        if session is None or self.is_relayed(session.raw.muxed_conn):
            return None
        remote = session.raw.get_remote_address()
        if not remote:
            return None
        ip = ipaddress.ip_address(remote[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return str(ip)

    def reachability(self) -> dict:
        """Whether peers can dial us (`autonat`): status "public", "private" or "unknown", the
        addresses they reached us at, and when that was checked."""
        return self._autonat.reachability.as_dict()

    def relay_status(self) -> dict:
        """Reservations held and served, circuits, bytes relayed, hole punches (for status pages)."""
        return {**self._relay.relay_status(), "hole_punch": dict(self._holepunch.stats)}

    def connection_kinds(self, peer_id: str) -> list[str]:
        """"direct" or "relayed" for each open connection to the peer."""
        return ["relayed" if self.is_relayed(c.muxed_conn) else "direct"
                for c in self._swarm.get_connections(ID.from_base58(peer_id)) if not c.is_closed]

    def relayed(self, peer_id: str) -> bool:
        kinds = self.connection_kinds(peer_id)
        return bool(kinds) and all(k == "relayed" for k in kinds)

    def is_direct(self, peer_id: str) -> bool:
        """Whether our current session with the peer runs on a direct (not relayed) connection."""
        session = self._session(peer_id)
        return session is not None and not self.is_relayed(session.raw.muxed_conn)

    def add_relay(self, addr: str, also_at: Sequence[str] = ()) -> str:
        """Reserve on one more relay (kept refreshed until dropped; its addresses `also_at` tried in
        turn when `addr` cannot be reached); returns its peer id."""
        return self._relay.add_relay(addr, also_at)

    def drop_relay(self, relay_id: str) -> None:
        self._relay.drop_relay(relay_id)

    def relays_held(self) -> dict[str, tuple[bool, P2PError | None]]:
        """Relay id -> (reservation live, the last attempt's error or None), for every relay in use."""
        return self._relay.relays_held()

    def add_address_listener(self, listener: Callable[[], None]) -> None:
        """`listener()` runs whenever our circuit addresses change (a reservation made or lost)."""
        self._relay.add_address_listener(listener)

    def now(self) -> float:
        return time.time()

    def add_address(self, peer_id: str, addr: str) -> None:
        self._book.add(peer_id, full_addr(addr, peer_id))

    def address_of(self, peer_id: str) -> str | None:
        return self._book.addr_of(peer_id)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def connected_peers(self) -> list[str]:
        return [p for p, sessions in self._sessions.items() if sessions]

    def _session(self, peer_id: str) -> RequestSession | None:
        for s in reversed(self._sessions.get(peer_id, ())):
            if not s.closed:
                return s
        return None

    async def connect(self, addr: str, timeout: float = 5.0) -> str:
        full = full_addr(addr)
        ma = multiaddr.Multiaddr(full)
        peer_id = full.rsplit("/p2p/", 1)[1]
        if peer_id == self.peer_id:
            raise PeerUnreachable("cannot connect to ourselves")
        self._book.add_if_missing(peer_id, full)
        if self._session(peer_id) is not None:
            return peer_id
        lock = self._dial_locks.setdefault((peer_id, full), trio.Lock())
        try:
            with self._book.dialing(peer_id), trio.fail_after(timeout):
                async with lock:
                    if self._session(peer_id) is not None:
                        return peer_id
                    await self._dial(peer_id, ma)
        except trio.TooSlowError:
            raise RequestTimeout(f"connecting to {peer_id} took longer than {timeout:g} s") from None
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dial_locks.pop((peer_id, full), None)
        return peer_id

    async def _dial(self, peer_id: str, ma: multiaddr.Multiaddr) -> None:
        pid = ID.from_base58(peer_id)
        relayed = split_circuit(str(ma)) is not None
        transport = ma.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
        for attempt in (1, 2):
            # A connection the peer has just closed can still be listed (host.connect then returns at
            # once); if opening our stream on it fails, drop it and dial afresh once.
            # The swarm refuses, for 60 s, to dial a peer whose addresses all failed once: a peer that
            # restarts would stay unreachable that long. We decide when to retry, so always dial.
            self._swarm.unblock_peer(pid)
            try:
                if relayed:
                    # A circuit: the relay connects us (`relay`); the connection then lives in the
                    # swarm like a direct one, and our session handshake runs on it unchanged.
                    if not self._swarm.get_connections(pid):
                        await self._relay.dial(str(ma), peer_id)
                elif not self._swarm.get_connections(pid):
                    # this address alone: the swarm's own dial_peer would wait for any dial of the peer
                    # in progress and pick from every address it ever noted for it
                    self._host.get_peerstore().add_addrs(pid, [transport], 120)
                    await self._swarm.dial_addr(transport, pid)
            except trio.Cancelled:
                raise
            except P2PError:
                raise
            except Exception as e:
                detail = str(_unwrap_group(e)) if isinstance(e, BaseExceptionGroup) else str(e)
                raise PeerUnreachable(f"cannot reach {peer_id} at {ma}: {type(e).__name__}: {detail[:300]}") from None
            try:
                raw = await self._host.new_stream(pid, [LIBP2P_PROTOCOL])
                break
            except trio.Cancelled:
                raise
            except Exception as e:
                await self._disconnect_quietly(peer_id)
                if attempt == 2:
                    if isinstance(e, StreamFailure):  # multistream-select found no common protocol
                        raise PeerUnreachable(f"{peer_id} does not speak {LIBP2P_PROTOCOL}") from None
                    raise PeerUnreachable(f"cannot open a stream to {peer_id}: {type(e).__name__}: {e}"[:400]) from None
        try:
            session = await self._handshake_as_dialer(peer_id, raw)
        except BaseException:
            await io.reset(raw)
            with trio.CancelScope(shield=True):
                await self._disconnect_quietly(peer_id)
            raise
        self._admit(session)
        self.spawn(session.run)

    async def _handshake_as_dialer(self, peer_id: str, raw: Any) -> RequestSession:
        reader = io.exact_reader(raw)
        admission = await gate.handshake_as_dialer(raw, reader, own_id=self.peer_id, peer_id=peer_id,
                                                   key=self.swarm_key, timeout=self.gate_timeout,
                                                   seen_at=self._far_end(raw))
        self._identify.observed_by(raw, admission.observed_addr)
        return RequestSession(self, peer_id, raw, reader)

    def _far_end(self, raw: Any) -> str | None:
        """Where we see the peer on `raw`'s connection (`gate.plain_addr`); None over a relay, whose
        socket's far end is the relay."""
        return None if self.is_relayed(raw.muxed_conn) else gate.plain_addr(raw.get_remote_address())

    async def _new_potluck_stream(self, peer_id: str) -> Any:
        """A new libp2p stream of our protocol to `peer_id` (its best connection); PeerUnreachable if none."""
        try:
            return await self._host.new_stream(ID.from_base58(peer_id), [LIBP2P_PROTOCOL])
        except trio.Cancelled:
            raise
        except Exception as e:
            raise PeerUnreachable(f"cannot open a stream to {peer_id}: {type(e).__name__}: {e}"[:400]) from None

    async def open_session(self, peer_id: str) -> RequestSession:
        """One more session with an admitted peer, on its best connection (libp2p prefers direct ones
        over relayed): hole punching moves a relayed peer here (`holepunch`)."""
        raw = await self._new_potluck_stream(peer_id)
        try:
            session = await self._handshake_as_dialer(peer_id, raw)
        except BaseException:
            await io.reset(raw)
            raise
        self._admit(session)
        self.spawn(session.run)
        return session

    def sessions_on(self, peer_id: str, muxed_conn: Any) -> list[RequestSession]:
        return [s for s in self._sessions.get(peer_id, ()) if s.raw.muxed_conn is muxed_conn]

    def _admit(self, session: RequestSession) -> None:
        patches.admitted(self._swarm, session.raw.muxed_conn)
        sessions = self._sessions.setdefault(session.peer_id, [])
        first = not any(not s.closed for s in sessions)
        sessions.append(session)
        if first:
            self._book.heard(session.peer_id)
            self._notify(session.peer_id, True)
            if self._identify.serve:
                self.spawn(self._identify_peer, session.peer_id)

    def session_ended(self, session: RequestSession) -> None:
        sessions = self._sessions.get(session.peer_id)
        if not sessions or session not in sessions:
            return
        sessions.remove(session)
        if not sessions:
            del self._sessions[session.peer_id]
            self._book.heard(session.peer_id)
            self._identify.forget(session.peer_id)
            self._notify(session.peer_id, False)
            self._close_sessionless(session.peer_id)

    async def _identify_peer(self, peer_id: str) -> None:
        try:
            await self._identify.identify(peer_id)
        except (P2PError, trio.TooSlowError) as e:
            # An identify that fails says nothing against the peer: sessions decide who is connected.
            log.info("identify of %s failed: %s", peer_id, e or type(e).__name__)

    def _notify(self, peer_id: str, connected: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(peer_id, connected)
            except Exception:
                log.exception("connection listener failed")

    def _on_connection(self, conn: Any) -> None:
        self.spawn(self._gate_watchdog, conn)

    async def _gate_watchdog(self, conn: Any) -> None:
        """Close a connection whose peer has not been admitted within the gate timeout."""
        await trio.sleep(self.gate_timeout)
        try:
            peer_id = conn.muxed_conn.peer_id.to_base58()
        except Exception:
            return
        if self._session(peer_id) is None and not conn.is_closed:
            log.info("disconnecting %s: no %s within %g s", peer_id,
                     "swarm key proof" if self.swarm_key else "handshake", self.gate_timeout)
            with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                try:
                    await conn.close()
                except Exception:
                    pass

    def _on_disconnection(self, conn: Any) -> None:
        try:
            peer_id = conn.muxed_conn.peer_id.to_base58()
        except Exception:
            return
        if self._swarm.get_connections(conn.muxed_conn.peer_id):
            return
        for s in list(self._sessions.get(peer_id, ())):
            s.finish("connection closed")

    def _close_sessionless(self, peer_id: str) -> None:
        """Close the connections to a peer we hold no session with (they serve nothing), so both sides
        agree. Only those open now: the peer may dial back before the close runs, and closing by peer
        id would take the new connection down with the old."""
        conns = list(self._swarm.get_connections(ID.from_base58(peer_id)))
        if conns:
            self.spawn(self._close_connections, conns)

    async def _close_connections(self, conns: list[Any]) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):  # see _disconnect_quietly
            for conn in conns:
                try:
                    await conn.close()
                except Exception:
                    pass

    async def _disconnect_quietly(self, peer_id: str) -> None:
        # Shielded: a close interrupted half-way (e.g. by the teardown of the connection's own handler
        # tasks) leaves the socket open while the swarm forgets it, and the peer never sees the close.
        with trio.CancelScope(shield=True), trio.move_on_after(2.0):
            try:
                await self._host.disconnect(ID.from_base58(peer_id))
            except Exception:
                pass

    async def drop_peer(self, peer_id: str) -> None:
        """Close every session with the peer and its connections (it broke the protocol)."""
        for s in list(self._sessions.get(peer_id, ())):
            await s.close("dropped")
        await self._disconnect_quietly(peer_id)

    async def disconnect(self, peer_id: str) -> None:
        for s in list(self._sessions.get(peer_id, ())):
            await s.close("disconnected by us")
        await self._disconnect_quietly(peer_id)

    # --- inbound libp2p streams ---------------------------------------------------------------------

    async def _on_libp2p_stream(self, raw: Any) -> None:
        try:
            peer_id = io.peer_of(raw)
        except Exception:
            await io.reset(raw)
            return
        reader = io.exact_reader(raw)
        try:
            with trio.fail_after(self.gate_timeout):
                first = expect_map(await io.read_frame(reader, io.MAX_OPENING_FRAME, self.gate_timeout), "first frame")
                kind = field(first, "t", str, max_len=16)
                if kind == "hello":
                    if len(self._sessions.get(peer_id, ())) >= 4:
                        raise FrameError("too many sessions")
                    admission = await gate.handshake_as_listener(raw, reader, first, own_id=self.peer_id,
                                                                 peer_id=peer_id, key=self.swarm_key,
                                                                 timeout=self.gate_timeout, seen_at=self._far_end(raw))
                elif kind == "open":
                    protocol = field(first, "p", str, max_len=MAX_PROTOCOL_LEN)
                else:
                    raise FrameError(f"unknown stream kind {kind!r}")
        except (FrameError, trio.TooSlowError) as e:
            why = "no first frame in time" if isinstance(e, trio.TooSlowError) else str(e)
            log.info("refused a stream from %s: %s", peer_id, why)
            await io.reset(raw)
            if self._session(peer_id) is None:
                self._close_sessionless(peer_id)
            return
        except StreamClosed:
            await io.reset(raw)
            return
        if kind == "hello":
            if admission is None:
                await io.close(raw)
                self._close_sessionless(peer_id)
                return
            self._identify.observed_by(raw, admission.observed_addr)
            session = RequestSession(self, peer_id, raw, reader)
            self._admit(session)
            if self.is_relayed(raw.muxed_conn):
                self._holepunch.relayed_session_accepted(peer_id)
            await session.run()
            return
        await self._serve_stream(peer_id, raw, reader, protocol)

    async def _refuse(self, raw: Any, kind: str, message: str) -> None:
        try:
            with trio.move_on_after(1.0):
                await io.write(raw, framing.frame({"t": "refuse", "e": kind, "m": message}))
        except StreamClosed:
            pass
        await io.close(raw)

    async def _serve_stream(self, peer_id: str, raw: Any, reader: ExactReader, protocol: str) -> None:
        if self._session(peer_id) is None:
            log.info("refused stream %s from unadmitted peer %s", protocol, peer_id)
            await io.reset(raw)
            self._close_sessionless(peer_id)
            return
        handler = self._stream_handlers.get(protocol)
        if handler is None:
            await self._refuse(raw, "ProtocolNotSupported", f"no handler for {protocol}")
            return
        if self._streams_in.get(peer_id, 0) >= self.max_streams_in:
            await self._refuse(raw, "Overloaded", f"more than {self.max_streams_in} open streams")
            return
        self._streams_in[peer_id] = self._streams_in.get(peer_id, 0) + 1
        stream = FlowControlledStream(self, raw, reader, peer_id, protocol)
        try:
            await io.write(raw, framing.frame({"t": "ok"}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.drain)
                try:
                    await handler(stream)
                except P2PError as e:
                    log.info("stream handler %s for %s ended: %s", protocol, peer_id, e)
                except Exception:
                    log.exception("stream handler %s failed", protocol)
                    await io.reset(raw)
                finally:
                    await stream.aclose()
                # Let the drain task finish on the peer's end of stream (bounded by linger).
                with trio.move_on_after(self.linger):
                    await stream.eof.wait()
                nursery.cancel_scope.cancel()
        except StreamClosed:
            pass
        finally:
            self._streams_in[peer_id] -= 1
            if not self._streams_in[peer_id]:
                del self._streams_in[peer_id]
            if not stream.closed_both_ways:
                await io.reset(raw)

    # --- protocols ----------------------------------------------------------------------------------

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def _ensure_session(self, peer_id: str) -> RequestSession:
        session = self._session(peer_id)
        if session is not None:
            return session
        addr = self._book.addr_of(peer_id)
        if addr is None:
            raise PeerUnreachable(f"no address known for {peer_id}; add_address() first")
        # The dial runs in the background, bounded by its own timeout: a caller that gives up first
        # (a short request deadline) does not abort it, and the next request joins it or finds the
        # session. A circuit through a relay 150 ms away takes ~4 s (Noise, multistream-select and
        # our handshake each cost round trips over both legs), longer than a ping's deadline.
        dial = self._implicit_dials.get(peer_id)
        if dial is None:
            if self._nursery is None or self._closing:
                raise StreamClosed("network is shutting down")
            dial = self._implicit_dials[peer_id] = (trio.Event(), [])
            self._nursery.start_soon(self._implicit_dial, peer_id, addr, dial)
        await dial[0].wait()
        if dial[1]:
            raise dial[1][0]
        session = self._session(peer_id)
        if session is None:
            raise PeerUnreachable(f"connection to {peer_id} closed right after the handshake")
        return session

    async def _implicit_dial(self, peer_id: str, addr: str, dial: tuple[trio.Event, list[BaseException]]) -> None:
        try:
            await self.connect(addr, timeout=self.relay_dial_timeout if split_circuit(addr) else 5.0)
        except P2PError as e:
            dial[1].append(e)
        except Exception as e:  # never let a dial take the network's nursery down
            dial[1].append(PeerUnreachable(f"dialing {peer_id} failed: {type(e).__name__}: {e}"[:400]))
        finally:
            self._implicit_dials.pop(peer_id, None)
            dial[0].set()

    async def request(self, peer_id: str, protocol: str, body: Any, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Any:
        try:
            with trio.fail_after(timeout):
                session = await self._ensure_session(peer_id)
                return await session.request(protocol, body)
        except trio.TooSlowError:
            raise RequestTimeout(f"{protocol} to {peer_id}: no answer within {timeout:g} s") from None

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        await self._ensure_session(peer_id)
        raw = await self._new_potluck_stream(peer_id)
        reader = io.exact_reader(raw)
        try:
            with trio.fail_after(self.gate_timeout + 3.0):
                await io.write(raw, framing.frame({"t": "open", "p": protocol}))
                answer = expect_map(await io.read_frame(reader, io.MAX_OPENING_FRAME, self.frame_timeout), "open reply")
                kind = field(answer, "t", str, max_len=16)
                if kind == "refuse":
                    what = field(answer, "e", str, max_len=100)
                    message = field(answer, "m", str, max_len=MAX_REMOTE_ERROR_LEN)
                    if what == "ProtocolNotSupported":
                        raise ProtocolNotSupported(f"peer {peer_id} does not serve {protocol}")
                    raise RemoteError(protocol, what, message)
                if kind != "ok":
                    raise FrameError(f"unexpected answer {kind!r} to open")
        except trio.TooSlowError:
            await io.reset(raw)
            raise RequestTimeout(f"peer {peer_id} did not accept stream {protocol} in time") from None
        except BaseException:
            await io.reset(raw)
            raise
        stream = FlowControlledStream(self, raw, reader, peer_id, protocol)
        if self._nursery is None or self._closing:
            await io.reset(raw)
            raise StreamClosed("network is shutting down")
        self._nursery.start_soon(stream.drain)
        return stream
