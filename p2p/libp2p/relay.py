"""Circuit relay v2 for `Libp2pNetwork`: volunteers behind NAT reachable through a public peer.

A peer behind NAT cannot be dialled. It keeps a connection open to a public member that runs the
relay service, *reserves* a slot there, and announces `<relay addr>/p2p-circuit/p2p/<its id>`. A peer
that dials that address asks the relay to CONNECT it to the target; the relay opens a STOP stream to
the target over the target's own (outbound) connection and then copies bytes both ways. The two ends
run Noise + yamux over that pair of streams, so the relay sees only ciphertext, cannot impersonate
either end, and our session handshake (with the swarm key gate) runs unchanged on top.

Wire protocol: libp2p circuit relay v2 (`/libp2p/circuit/relay/0.2.0/hop` and `/stop`, the protobuf
messages of py-libp2p's `libp2p.relay.circuit_v2.pb`). The handlers are our own rather than
py-libp2p 0.8.1's `CircuitV2Protocol`/`CircuitV2Transport`, because that implementation, as read:
- serves HOP to any peer that can open a stream: it knows nothing of our swarm key gate, so an
  outsider could reserve slots and have the relay open circuits into the swarm;
- accepts a RESERVE whose `peer` field names another peer (a reservation on someone else's behalf);
- keys its active circuits by peer id in `_active_relays`, so when one of two circuits to the same
  target ends it closes the other one's streams;
- detects end-of-stream only for mplex (with yamux every circuit end logs an error and waits out
  0.6 s of read retries), and its reservation refresher never notices a relay that restarted (it
  re-reserves only shortly before the one-hour expiry).

Security (private swarms)
-------------------------
- HOP is served only to *admitted* peers (peers that passed our gate on a direct connection to the
  relay) and never over a relayed connection; anything else is reset without an answer.
- A reservation is for the reserving connection's own peer id only, and lives only as long as that
  peer's session with the relay (and at most `RelayLimits.reservation_ttl`).
- CONNECT reaches only targets that are admitted *and* hold a live reservation.
- STOP is accepted only from relays this peer holds a reservation on; the circuit's Noise identity
  must be the initiator the relay announced, and the connection must then pass our gate (with the
  swarm key) like any other before anything is served on it.

Relays are given at start (`relays`) or added and dropped while running (`add_relay`, `drop_relay`:
a chooser above this layer picks them); either way each has one reservation keeper task, and
`add_address_listener` callbacks hear when our circuit addresses change.

Only peers that use relaying register the extra libp2p protocols: `/hop` on relay services, `/stop` on
peers from their first relay on. A peer with neither keeps serving `/potluck/1.0.0` alone.
"""

from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import trio
from libp2p.connection_types import ConnectionType
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, Limit, PeerId, Reservation, Status, StopMessage
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
import multiaddr

from ..errors import P2PError, PeerUnreachable, SwarmKeyMismatch
from ..network import ConnectionListener
from . import io
from .addresses import circuit_addr, full_addr, split_circuit
from .gate import GatedHost

log = logging.getLogger(__name__)

HOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/hop")
STOP_PROTOCOL = TProtocol("/libp2p/circuit/relay/0.2.0/stop")

# Status codes of circuit relay v2 (pb Status).
OK = Status.OK  # 100
RESERVATION_REFUSED = Status.RESERVATION_REFUSED  # 200
RESOURCE_LIMIT_EXCEEDED = Status.RESOURCE_LIMIT_EXCEEDED  # 201
PERMISSION_DENIED = Status.PERMISSION_DENIED  # 202
CONNECTION_FAILED = Status.CONNECTION_FAILED  # 203
NO_RESERVATION = Status.NO_RESERVATION  # 204
MALFORMED_MESSAGE = Status.MALFORMED_MESSAGE  # 400
UNEXPECTED_MESSAGE = Status.UNEXPECTED_MESSAGE  # 401

_STATUS_NAMES: dict[int, str] = {
    OK: "OK", RESERVATION_REFUSED: "RESERVATION_REFUSED", RESOURCE_LIMIT_EXCEEDED: "RESOURCE_LIMIT_EXCEEDED",
    PERMISSION_DENIED: "PERMISSION_DENIED", CONNECTION_FAILED: "CONNECTION_FAILED",
    NO_RESERVATION: "NO_RESERVATION", MALFORMED_MESSAGE: "MALFORMED_MESSAGE",
    UNEXPECTED_MESSAGE: "UNEXPECTED_MESSAGE",
}
_PUMP_READ = 1 << 16


class RelayRefused(PeerUnreachable):
    """A relay refused a reservation or a circuit; `status` is the circuit relay v2 status code."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RelayLimits:
    """What a relay service grants. Circuits carry long inference sessions, so the per-circuit caps
    are far above libp2p's defaults (2 min, 128 KiB); a circuit that hits one is reset and the two
    ends redial (a new circuit) through membership's usual reconnection."""

    max_reservations: int = 128
    reservation_ttl: int = 3600  # seconds; clients refresh at half-life
    max_circuits: int = 512
    max_circuits_per_peer: int = 32  # as source or as target
    circuit_duration: float = 12 * 3600.0  # seconds, 0 = unlimited
    circuit_data: int = 16 << 30  # bytes, both directions together, 0 = unlimited


def _status_name(code: int) -> str:
    return _STATUS_NAMES.get(code, str(code))


def _pid(raw_id: bytes) -> ID | None:
    try:
        pid = ID(raw_id)
        pid.to_base58()
        return pid
    except Exception:
        return None


class RelayHost(GatedHost, Protocol):
    """What the relay needs of its network besides `GatedHost`."""

    @property
    def closing(self) -> bool: ...

    async def connect(self, addr: str, timeout: float = 5.0) -> str: ...

    def direct_addrs(self) -> list[str]: ...

    def add_connection_listener(self, listener: ConnectionListener) -> None: ...


class CircuitRelay:
    """The relay parts of one `Libp2pNetwork`: circuit dialing (always), the relay service (HOP,
    with `service=True`) and reservations on `relays` (with STOP to accept circuits)."""

    def __init__(self, net: RelayHost, *, service: bool = False, relays: list[str] | None = None,
                 limits: RelayLimits | None = None, timeout: float = 10.0):
        self.net = net
        self.host = net.host
        self.service = service
        self.limits = limits or RelayLimits()
        self.timeout = timeout
        self.relays: dict[str, str] = {}  # relay id -> its address (with /p2p/<id>) last reached
        self._fallbacks: dict[str, list[str]] = {}  # relay id -> its other addresses, tried in turn
        for addr in relays or []:
            relay_id, full = self._parse_relay(addr)
            self.relays[relay_id] = full
        # client side
        self._reserved: dict[str, float] = {}  # relay id -> reservation expiry (unix time)
        self._relay_lost: dict[str, trio.Event] = {rid: trio.Event() for rid in self.relays}
        self._relay_errors: dict[str, P2PError] = {}
        self._first_attempt: dict[str, trio.Event] = {rid: trio.Event() for rid in self.relays}
        self._keepers: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        self._addr_listeners: list[Callable[[], None]] = []
        # service side
        self._reservations: dict[str, float] = {}  # peer id -> expiry (unix time)
        self._circuits_of: dict[str, int] = {}
        self._circuits = 0
        self.stats = {"circuits_opened": 0, "circuits_refused": 0, "bytes_relayed": 0}
        self._relayed_conns: weakref.WeakSet = weakref.WeakSet()
        if service:
            self.host.set_stream_handler(HOP_PROTOCOL, self._on_hop)
        self._accepting_circuits = False
        if self.relays:
            self._accept_circuits()
        net.add_connection_listener(self._on_peer)

    def _accept_circuits(self) -> None:
        if not self._accepting_circuits:
            self.host.set_stream_handler(STOP_PROTOCOL, self._on_stop)
            self._accepting_circuits = True

    def _parse_relay(self, addr: str) -> tuple[str, str]:
        """(relay id, full address) of a relay's own address; ValueError for anything else."""
        try:
            full = full_addr(addr)
        except PeerUnreachable as e:
            raise ValueError(f"relay address {addr!r}: {e}") from None
        if split_circuit(full) is not None:
            raise ValueError(f"relay address {addr!r} is itself a circuit address; give the relay's own address")
        relay_id = full.rsplit("/p2p/", 1)[1]
        if relay_id == self.net.peer_id:
            raise ValueError("this peer cannot be its own relay")
        return relay_id, full

    # --- lifecycle (driven by Libp2pNetwork.open) ----------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Start one reservation keeper per relay; wait until each has made its first attempt (bounded
        by `timeout`). Raises when every relay definitively refused us (retrying cannot help)."""
        self._nursery = nursery
        if not self.relays:
            return
        for relay_id in self.relays:
            self._start_keeper(relay_id)
        with trio.move_on_after(self.timeout + 1.0):
            for event in self._first_attempt.values():
                await event.wait()
        refusals = [e for e in self._relay_errors.values() if isinstance(e, (SwarmKeyMismatch, RelayRefused))]
        if refusals and len(refusals) == len(self.relays):
            raise refusals[0]
        for relay_id, addr in self.relays.items():
            if relay_id not in self._reserved:
                log.warning("no reservation on relay %s yet (%s); retrying in the background", addr,
                            self._relay_errors.get(relay_id, "no answer"))

    def add_relay(self, addr: str, also_at: Sequence[str] = ()) -> str:
        """Start holding a reservation on the relay at `addr` (kept like those given at start), tried
        at `also_at` in turn when `addr` cannot be reached; returns its peer id. ValueError for an
        address that is no relay's own, our own, or another relay's than `addr`'s."""
        relay_id, full = self._parse_relay(addr)
        others = [self._parse_relay(a) for a in also_at]
        if any(other_id != relay_id for other_id, _ in others):
            raise ValueError(f"the addresses of relay {relay_id} name other peers")
        if relay_id not in self.relays:
            self._accept_circuits()
            self.relays[relay_id] = full
            self._fallbacks[relay_id] = [a for _, a in others if a != full]
            self._relay_lost[relay_id] = trio.Event()
            self._first_attempt[relay_id] = trio.Event()
            self._start_keeper(relay_id)
        return relay_id

    def drop_relay(self, relay_id: str) -> None:
        """Stop using a relay: its keeper ends and its circuit address is no longer ours."""
        scope = self._keepers.pop(relay_id, None)
        if scope is not None:
            scope.cancel()
        self.relays.pop(relay_id, None)
        self._fallbacks.pop(relay_id, None)
        self._relay_lost.pop(relay_id, None)
        self._relay_errors.pop(relay_id, None)
        self._first_attempt.pop(relay_id, None)
        if self._reserved.pop(relay_id, None) is not None:
            self._addrs_changed()

    def relays_held(self) -> dict[str, tuple[bool, P2PError | None]]:
        """Every relay in use: relay id -> (reservation live, the last attempt's error or None)."""
        now = time.time()
        return {r: (self._reserved.get(r, 0) > now, self._relay_errors.get(r)) for r in self.relays}

    def add_address_listener(self, listener: Callable[[], None]) -> None:
        """`listener()` runs whenever a reservation is made or lost (our circuit addresses change)."""
        self._addr_listeners.append(listener)

    def _addrs_changed(self) -> None:
        for listener in self._addr_listeners:
            listener()

    def _start_keeper(self, relay_id: str) -> None:
        if self._nursery is None:
            raise RuntimeError("the relay client starts with its network (Libp2pNetwork.open)")
        scope = self._keepers[relay_id] = trio.CancelScope()
        addrs = [self.relays[relay_id], *self._fallbacks.get(relay_id, [])]
        first_attempt = self._first_attempt[relay_id]

        async def keeper() -> None:
            with scope:
                await self._keep_reservation(relay_id, addrs, first_attempt, scope)

        self._nursery.start_soon(keeper)

    def circuit_addrs(self) -> list[str]:
        """Our addresses through relays we hold a live reservation on."""
        now = time.time()
        return [circuit_addr(self.relays[r], self.net.peer_id) for r, exp in self._reserved.items() if exp > now]

    def relay_status(self) -> dict:
        """For status pages: reservations held (client) and served (relay service)."""
        now = time.time()
        return {
            "relay_service": self.service,
            "reserved_on": {self.relays[r]: round(exp - now) for r, exp in self._reserved.items()},
            "relay_errors": {self.relays[r]: str(e) for r, e in self._relay_errors.items()},
            "reservations_served": len(self._reservations),
            "circuits_active": self._circuits,
            **self.stats,
        }

    def is_relayed(self, muxed_conn: Any) -> bool:
        return muxed_conn in self._relayed_conns

    def _on_peer(self, peer_id: str, connected: bool) -> None:
        if connected:
            return
        if self._reservations.pop(peer_id, None) is not None:
            log.info("reservation of %s ended with its session", peer_id)
        if peer_id in self._relay_lost:
            if self._reserved.pop(peer_id, None) is not None:
                self._addrs_changed()
            self._relay_lost[peer_id].set()

    # --- client: reservations -----------------------------------------------------------------------

    async def _keep_reservation(self, relay_id: str, addrs: list[str], first_attempt: trio.Event,
                                scope: trio.CancelScope) -> None:
        """Hold a reservation on one relay for as long as the network runs: connect at the first of
        `addrs` that answers, reserve, refresh at half the reservation's life, and re-reserve (after
        backoff) whenever the relay's session ends.
        `drop_relay` cancels `scope`; a connect or refresh that completed in the same tick still
        resumes here, so every step back from an await checks for that before touching our tables."""
        backoff = 1.0
        addr = addrs[0]
        while True:
            self._relay_lost[relay_id] = lost = trio.Event()
            try:
                addr = await self._connect_any(addrs)
                if scope.cancel_called:
                    return
                self.relays[relay_id] = addr
                while True:
                    expires = await self._reserve(addr)
                    if scope.cancel_called:
                        return
                    gained = relay_id not in self._reserved
                    self._reserved[relay_id] = expires
                    if gained:
                        log.info("reserved a slot on relay %s: reachable at %s", addr,
                                 circuit_addr(addr, self.net.peer_id))
                        self._addrs_changed()
                    self._relay_errors.pop(relay_id, None)
                    first_attempt.set()
                    backoff = 1.0
                    with trio.move_on_after(max(1.0, (expires - time.time()) / 2)):
                        await lost.wait()
                    if lost.is_set():
                        if not self.net.closing:
                            log.warning("lost the connection to relay %s; reserving again", addr)
                        break
            except Exception as e:
                first_attempt.set()
                if scope.cancel_called:
                    return
                if not isinstance(e, P2PError):
                    log.exception("reservation keeper for relay %s failed", addr)
                    e = PeerUnreachable(f"reservation on {addr} failed: {type(e).__name__}: {e}"[:400])
                if self._reserved.pop(relay_id, None) is not None:
                    self._addrs_changed()
                self._relay_errors[relay_id] = e
                log.warning("reservation on relay %s failed: %s", addr, e)
                if isinstance(e, (SwarmKeyMismatch, RelayRefused)):
                    backoff = 60.0  # a configuration problem: retry rarely
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def _connect_any(self, addrs: list[str]) -> str:
        """The first of a relay's addresses we connect to, tried in turn; the last failure's error."""
        for addr in addrs[:-1]:
            try:
                await self.net.connect(addr, timeout=self.timeout)
                return addr
            except P2PError as e:
                log.info("relay %s: %s; trying its next address", addr, e)
        await self.net.connect(addrs[-1], timeout=self.timeout)
        return addrs[-1]

    async def _reserve(self, addr: str) -> float:
        """One RESERVE exchange with the relay at `addr`; returns the reservation's expiry (unix time)."""
        stream = await self._open_hop(addr.rsplit("/p2p/", 1)[1], addr)
        try:
            with trio.fail_after(self.timeout):
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE))
                resp = await read_delimited_msg(stream, HopMessage)
        except trio.TooSlowError:
            await io.reset(stream)
            raise PeerUnreachable(f"relay {addr} did not answer the reservation within {self.timeout:g} s") from None
        except Exception as e:
            await io.reset(stream)
            raise PeerUnreachable(f"relay {addr} broke off the reservation: {type(e).__name__}: {e}"[:400]) from None
        await io.close(stream)
        status = resp.status if resp.HasField("status") else 0
        if resp.type != HopMessage.STATUS or status != OK:
            raise RelayRefused(f"relay {addr} refused the reservation: {_status_name(status)}", status)
        if resp.HasField("reservation") and resp.reservation.expire:
            return float(resp.reservation.expire)
        return time.time() + 3600.0

    async def _open_hop(self, relay_id: str, addr: str) -> Any:
        try:
            return await self.host.new_stream(ID.from_base58(relay_id), [HOP_PROTOCOL])
        except trio.Cancelled:
            raise
        except StreamFailure:
            raise RelayRefused(f"peer {addr} is not a relay: it does not serve circuit relay v2 "
                               "(start it with relay_service=True, `potluck serve --relay-service`)") from None
        except Exception as e:
            raise PeerUnreachable(f"cannot open a relay stream to {addr}: {type(e).__name__}: {e}"[:400]) from None

    # --- client: dialing a circuit address -----------------------------------------------------------

    async def dial(self, addr: str, target: str) -> None:
        """Open a libp2p connection to `target` through the relay named in circuit address `addr`
        (it is then in the swarm: new_stream and our handshake work on it as on a direct one)."""
        parts = split_circuit(addr)
        assert parts is not None
        relay_addr, _ = parts
        relay_id = relay_addr.rsplit("/p2p/", 1)[1]
        if relay_id == self.net.peer_id:
            raise PeerUnreachable(f"{target} is reachable only through this peer as its relay, and it is not "
                                  "connected to us")
        if relay_id == target:
            raise PeerUnreachable(f"circuit address {addr} relays a peer through itself")
        await self.net.connect(relay_addr, timeout=self.timeout)
        stream = await self._open_hop(relay_id, relay_addr)
        try:
            with trio.fail_after(self.timeout):
                await write_delimited_msg(stream, HopMessage(type=HopMessage.CONNECT,
                                                             peer=PeerId(id=ID.from_base58(target).to_bytes())))
                resp = await read_delimited_msg(stream, HopMessage)
            status = resp.status if resp.HasField("status") else 0
            if resp.type != HopMessage.STATUS or status != OK:
                raise RelayRefused(self._connect_refusal(status, relay_addr, target), status)
            ma = multiaddr.Multiaddr(addr)
            raw = RawConnection(stream=stream, initiator=True, connection_type=ConnectionType.RELAYED, addresses=[ma])
            with trio.fail_after(self.timeout):
                conn = await self.host.upgrade_outbound_connection(raw, ID.from_base58(target))
        except trio.TooSlowError:
            await io.reset(stream)
            raise PeerUnreachable(f"no circuit to {target} through relay {relay_addr} within {self.timeout:g} s") from None
        except RelayRefused:
            await io.reset(stream)
            raise
        except trio.Cancelled:
            await io.reset(stream)
            raise
        except Exception as e:
            await io.reset(stream)
            raise PeerUnreachable(f"circuit to {target} through {relay_addr} failed: {type(e).__name__}: {e}"[:400]) from None
        self._relayed_conns.add(conn.muxed_conn)

    @staticmethod
    def _connect_refusal(status: int, relay: str, target: str) -> str:
        if status == NO_RESERVATION:
            return (f"relay {relay} holds no reservation for {target}: that peer is not (or no longer) "
                    "reachable through this relay")
        if status == PERMISSION_DENIED:
            return f"relay {relay} refused to relay for us (PERMISSION_DENIED)"
        if status == RESOURCE_LIMIT_EXCEEDED:
            return f"relay {relay} is at its circuit limit (RESOURCE_LIMIT_EXCEEDED)"
        if status == CONNECTION_FAILED:
            return f"relay {relay} could not reach {target} (CONNECTION_FAILED)"
        return f"relay {relay} refused the circuit to {target}: {_status_name(status)}"

    # --- client: accepting a circuit (STOP) ----------------------------------------------------------

    async def _on_stop(self, stream: Any) -> None:
        relay = stream.muxed_conn.peer_id.to_base58()
        if relay not in self._reserved or not self.net.admitted(relay):
            log.info("refused a circuit from %s: we hold no reservation there", relay)
            await io.reset(stream)
            return
        try:
            with trio.fail_after(self.timeout):
                msg = await read_delimited_msg(stream, StopMessage)
                source = _pid(msg.peer.id) if msg.type == StopMessage.CONNECT and msg.HasField("peer") else None
                if source is None:
                    await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS, status=MALFORMED_MESSAGE))
                    await io.reset(stream)
                    return
                await write_delimited_msg(stream, StopMessage(type=StopMessage.STATUS, status=OK))
                ma = multiaddr.Multiaddr(circuit_addr(self.relays[relay], source.to_base58()))
                raw = RawConnection(stream=stream, initiator=False, connection_type=ConnectionType.RELAYED,
                                    addresses=[ma])
                muxed = await self.host.upgrade_inbound_connection(raw, ma)
        except trio.Cancelled:
            await io.reset(stream)
            raise
        except Exception as e:
            log.info("circuit from relay %s failed: %s", relay, e)
            await io.reset(stream)
            return
        self._relayed_conns.add(muxed)
        if muxed.peer_id != source:
            log.warning("circuit via %s announced %s but Noise authenticated %s; closing", relay,
                        source.to_base58(), muxed.peer_id.to_base58())
            with trio.move_on_after(2.0, shield=True):  # type: ignore[call-arg]  # stale trio-typing stub
                try:
                    await muxed.close()
                except Exception:
                    pass

    # --- relay service (HOP) ------------------------------------------------------------------------

    async def _wait_admitted(self, peer_id: str, wait: float = 1.0) -> bool:
        """Whether peer_id passed our gate; a HOP stream may race the end of the session handshake."""
        with trio.move_on_after(wait):
            while not self.net.admitted(peer_id):
                await trio.sleep(0.02)
            return True
        return False

    async def _on_hop(self, stream: Any) -> None:
        source = stream.muxed_conn.peer_id.to_base58()
        if self.is_relayed(stream.muxed_conn) or not await self._wait_admitted(source):
            log.info("refused a relay request from %s: %s", source,
                     "over a relayed connection" if self.is_relayed(stream.muxed_conn) else "not admitted")
            self.stats["circuits_refused"] += 1
            await io.reset(stream)
            return
        try:
            with trio.fail_after(self.timeout):
                msg = await read_delimited_msg(stream, HopMessage)
        except trio.Cancelled:
            raise
        except Exception:
            await io.reset(stream)
            return
        if msg.type == HopMessage.RESERVE:
            await self._serve_reserve(stream, source, msg)
        elif msg.type == HopMessage.CONNECT:
            await self._serve_connect(stream, source, msg)
        else:
            await self._status(stream, MALFORMED_MESSAGE)
            await io.reset(stream)

    async def _status(self, stream: Any, code: Status.ValueType, **fields: Any) -> bool:
        try:
            with trio.fail_after(self.timeout):
                await write_delimited_msg(stream, HopMessage(type=HopMessage.STATUS, status=code, **fields))
            return True
        except trio.Cancelled:
            raise
        except Exception:
            return False

    async def _serve_reserve(self, stream: Any, source: str, msg: HopMessage) -> None:
        if msg.HasField("peer") and msg.peer.id and _pid(msg.peer.id) != ID.from_base58(source):
            log.info("refused a reservation from %s on behalf of another peer", source)
            await self._status(stream, PERMISSION_DENIED)
            await io.close(stream)
            return
        now = time.time()
        for peer, exp in list(self._reservations.items()):
            if exp <= now:
                del self._reservations[peer]
        if source not in self._reservations and len(self._reservations) >= self.limits.max_reservations:
            await self._status(stream, RESERVATION_REFUSED)
            await io.close(stream)
            return
        expires = int(now + self.limits.reservation_ttl)
        self._reservations[source] = expires
        relay_addrs = [multiaddr.Multiaddr(a).to_bytes() for a in self.net.direct_addrs()]
        await self._status(stream, OK, reservation=Reservation(expire=expires, addrs=relay_addrs),
                           limit=self._limit())
        await io.close(stream)

    def _limit(self) -> Limit:
        return Limit(duration=int(self.limits.circuit_duration), data=int(self.limits.circuit_data))

    async def _serve_connect(self, stream: Any, source: str, msg: HopMessage) -> None:
        target_pid = _pid(msg.peer.id) if msg.HasField("peer") else None
        if target_pid is None:
            await self._status(stream, MALFORMED_MESSAGE)
            await io.reset(stream)
            return
        target = target_pid.to_base58()
        refusal = None
        if self._reservations.get(target, 0) <= time.time() or not self.net.admitted(target) or target == source:
            refusal = NO_RESERVATION
        elif (self._circuits >= self.limits.max_circuits
              or self._circuits_of.get(target, 0) >= self.limits.max_circuits_per_peer
              or self._circuits_of.get(source, 0) >= self.limits.max_circuits_per_peer):
            refusal = RESOURCE_LIMIT_EXCEEDED
        if refusal is not None:
            self.stats["circuits_refused"] += 1
            log.info("refused a circuit %s -> %s: %s", source, target, _status_name(refusal))
            await self._status(stream, refusal)
            await io.close(stream)
            return
        self._circuits += 1
        for p in (source, target):
            self._circuits_of[p] = self._circuits_of.get(p, 0) + 1
        dst = None
        try:
            try:
                with trio.fail_after(self.timeout):
                    dst = await self.host.new_stream(target_pid, [STOP_PROTOCOL])
                    await write_delimited_msg(dst, StopMessage(type=StopMessage.CONNECT,
                                                               peer=PeerId(id=ID.from_base58(source).to_bytes()),
                                                               limit=self._limit()))
                    resp = await read_delimited_msg(dst, StopMessage)
                if resp.type != StopMessage.STATUS or resp.status != OK:
                    raise PeerUnreachable(f"target answered {_status_name(resp.status)}")
            except trio.Cancelled:
                raise
            except Exception as e:
                log.info("circuit %s -> %s failed at the target: %s", source, target, e)
                self.stats["circuits_refused"] += 1
                await self._status(stream, CONNECTION_FAILED)
                await io.reset(stream)
                if dst is not None:
                    await io.reset(dst)
                return
            if not await self._status(stream, OK, limit=self._limit()):
                await io.reset(stream)
                await io.reset(dst)
                return
            self.stats["circuits_opened"] += 1
            await self._pump(stream, dst)
        finally:
            self._circuits -= 1
            for p in (source, target):
                self._circuits_of[p] -= 1
                if not self._circuits_of[p]:
                    del self._circuits_of[p]

    async def _pump(self, a: Any, b: Any) -> None:
        """Copy bytes both ways until both ends finish; end-of-stream is passed on as a half-close,
        a reset (or a cap reached) resets both."""
        budget = [self.limits.circuit_data or -1]
        failed = trio.Event()

        async def copy(src: Any, dst: Any) -> None:
            read = getattr(src, "muxed_stream", src).read
            write = getattr(dst, "muxed_stream", dst).write
            while True:
                try:
                    data = await read(_PUMP_READ)
                except EOFError:
                    data = b""
                except trio.Cancelled:
                    raise
                except Exception:
                    failed.set()
                    return
                if not data:
                    await io.close(dst)
                    return
                self.stats["bytes_relayed"] += len(data)
                if budget[0] >= 0:
                    budget[0] -= len(data)
                    if budget[0] < 0:
                        log.info("circuit reached its data cap of %d bytes; resetting it", self.limits.circuit_data)
                        failed.set()
                        return
                try:
                    await write(data)
                except trio.Cancelled:
                    raise
                except Exception:
                    failed.set()
                    return

        async with trio.open_nursery() as nursery:
            async def both() -> None:
                async with trio.open_nursery() as inner:
                    inner.start_soon(copy, a, b)
                    inner.start_soon(copy, b, a)
                nursery.cancel_scope.cancel()

            async def watch() -> None:
                with trio.move_on_after(self.limits.circuit_duration or float("inf")):
                    await failed.wait()
                failed.set()
                nursery.cancel_scope.cancel()

            nursery.start_soon(both)
            nursery.start_soon(watch)
        if failed.is_set():
            await io.reset(a)
            await io.reset(b)
