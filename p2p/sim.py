"""The `Network` interface in memory, under trio's clock (virtual in tests: `MockClock`).

One `SimWorld` holds every simulated peer. Nothing travels through sockets: a message is a msgpack
body (`framing.encode`, so size limits match the real backend) put on ONE heap of
(deliver_at, seq, callback) that a single scheduler task drains. Only running a handler takes a
task; there are no per-message sleeps and no per-connection readers, so 10,000 peers fit in one
process.

What the model gives: one-way delay from great-circle distance plus last miles and jitter
(`LatencyModel`), optional per-sender uplink bandwidth, random loss of requests and dials, crashes
(connections closed, in-flight messages dropped, handlers cancelled), restarts, partitions that cut
the connections across and drop dials across. Streams are reliable while their connection lives: a
lost stream message costs one extra RTT, as a TCP retransmit would.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import Counter, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterable

import trio

from . import framing
from .errors import PeerUnreachable, ProtocolNotSupported, RemoteError, RequestTimeout, StreamClosed
from .identity import Identity
from .network import (
    DEFAULT_REQUEST_TIMEOUT,
    MAX_REMOTE_ERROR_LEN,
    ConnectionListener,
    Network,
    RequestHandler,
    Stream,
    StreamHandler,
)

log = logging.getLogger(__name__)

EPOCH = 1.7e9  # `now()` = EPOCH + trio clock, so record expiry times look like real ones
_EARTH_RADIUS_KM = 6371.0
_FIBRE_KM_PER_S = 200_000.0  # light in fibre: about 2/3 c
_PATH_STRETCH = 1.5  # cables do not follow great circles
# Where `add_node` puts peers that were given no place: (region, lat, lon) of a few hubs.
_HUBS = (
    ("us-west", 37.4, -122.1), ("us-east", 39.0, -77.5), ("sa-east", -23.5, -46.6),
    ("eu-west", 50.1, 8.7), ("eu-north", 59.3, 18.1), ("ap-south", 19.1, 72.9),
    ("ap-east", 35.7, 139.7), ("ap-southeast", -33.9, 151.2),
)


@dataclass(frozen=True)
class Place:
    """Where a simulated node sits; `last_mile_ms` is what its access link adds to every RTT."""

    lat: float
    lon: float
    region: str = ""
    last_mile_ms: float = 5.0


class LatencyModel:
    """Per-pair delay: a deterministic base RTT from geography, and jittered one-way samples."""

    def __init__(self, *, jitter: float = 0.1, seed: int = 0):
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter is a fraction in [0, 1)")
        self.jitter = jitter
        self._rng = random.Random(seed)

    def rtt(self, a: Place, b: Place) -> float:
        """Base round-trip time in seconds: great circle at 2/3 c, ×1.5 path stretch, + both last miles."""
        la, lb = math.radians(a.lat), math.radians(b.lat)
        h = math.sin((lb - la) / 2) ** 2 + math.cos(la) * math.cos(lb) * math.sin(math.radians(b.lon - a.lon) / 2) ** 2
        km = 2 * _EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
        return 2 * km * _PATH_STRETCH / _FIBRE_KM_PER_S + (a.last_mile_ms + b.last_mile_ms) / 1000.0

    def one_way(self, a: Place, b: Place) -> float:
        """One sample of a one-way delay: rtt/2 × (1 + jitter·U(-1, 1))."""
        return self.rtt(a, b) / 2 * (1.0 + self.jitter * (2.0 * self._rng.random() - 1.0))


class _Connection:
    """One connection between two nodes. Messages carry it; once it is closed they are dropped."""

    __slots__ = ("a", "b", "alive", "streams")

    def __init__(self, a: "SimNode", b: "SimNode"):
        self.a, self.b = a, b
        self.alive = True
        self.streams: set[SimStream] = set()

    def other(self, node: "SimNode") -> "SimNode":
        return self.b if node is self.a else self.a


class _Waiter:
    __slots__ = ("task",)

    def __init__(self, task: trio.lowlevel.Task):
        self.task: trio.lowlevel.Task | None = task


class _Pending:
    """An answer (a reply, a dial, a stream accept) that callers wait for, each until its own deadline.

    Deadlines live on the world's timeout heap rather than in cancel scopes: a request then costs
    one heap entry, not a scope and a trio timer.
    """

    __slots__ = ("done", "value", "error", "_waiters")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: Exception | None = None
        self._waiters: list[_Waiter] = []

    def resolve(self, value: Any = None, error: Exception | None = None) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        for waiter in self._waiters:
            _wake(waiter)
        self._waiters.clear()

    async def wait(self, world: "SimWorld", deadline: float, what: str) -> Any:
        if self.done:
            await trio.lowlevel.checkpoint()
        else:
            waiter = _Waiter(trio.lowlevel.current_task())
            self._waiters.append(waiter)
            world._add_timeout(deadline, waiter)

            def abort(_: Any) -> trio.lowlevel.Abort:
                waiter.task = None
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
            if not self.done:
                raise RequestTimeout(f"{what}: no answer before the deadline")
        if self.error is not None:
            raise self.error
        return self.value


def _wake(waiter: _Waiter) -> None:
    if waiter.task is not None:
        trio.lowlevel.reschedule(waiter.task)
        waiter.task = None


class SimWorld:
    """Every simulated peer, the clock-driven delivery queue, and the fault model.

    Counters: `messages_sent[peer_id]`, `bytes_sent[peer_id]` (every message a peer put on the wire,
    dials and replies included), `total_messages`, `total_bytes`, `messages_dropped` (lost to `loss`).
    """

    def __init__(self, *, seed: int = 0, latency: LatencyModel | None = None, loss: float = 0.0,
                 bandwidth_bps: float | None = None, resolution: float = 0.001):
        # Arrivals are rounded up to a `resolution` grid (seconds; 0 = exact) so that near-simultaneous
        # ones share one wake-up of the scheduler: twice the throughput at 1 ms.
        self.resolution = resolution
        self.latency = latency or LatencyModel(seed=seed)
        self.loss = loss
        self.bandwidth_bps = bandwidth_bps
        self._rng = random.Random(seed)
        self._nodes: list[SimNode] = []
        self._by_id: dict[str, SimNode] = {}
        self._group: dict[str, int] | None = None  # partition: peer id -> group; None when whole
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._timeouts: list[tuple[float, int, _Waiter]] = []
        self._seq = itertools.count()
        self._sleep: trio.CancelScope | None = None  # the scheduler's, while it waits for the next event
        self._nursery: trio.Nursery | None = None
        self.messages_sent: Counter[str] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.total_messages = 0
        self.total_bytes = 0
        self.messages_dropped = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, **kw: Any) -> AsyncIterator["SimWorld"]:
        """A running world; leaving the block cancels every delivery and handler."""
        world = cls(**kw)
        async with trio.open_nursery() as nursery:
            world._nursery = nursery
            nursery.start_soon(world._scheduler)
            try:
                yield world
            finally:
                nursery.cancel_scope.cancel()
                world._nursery = None

    # --- nodes -----------------------------------------------------------------------------------

    def add_node(self, identity: Identity | None = None, place: Place | None = None) -> "SimNode":
        identity = identity or Identity(self._rng.randbytes(32))
        if identity.peer_id in self._by_id:
            raise ValueError(f"peer {identity.peer_id} is already in this world")
        if place is None:
            region, lat, lon = self._rng.choice(_HUBS)
            place = Place(lat + self._rng.gauss(0, 2.0), lon + self._rng.gauss(0, 2.0), region)
        node = SimNode(self, identity, place, len(self._nodes))
        self._nodes.append(node)
        self._by_id[node.peer_id] = node
        return node

    def node(self, peer_id: str) -> "SimNode":
        return self._by_id[peer_id]

    @property
    def nodes(self) -> list["SimNode"]:
        return list(self._nodes)

    def rtt(self, a: str, b: str) -> float:
        return self.latency.rtt(self._by_id[a].place, self._by_id[b].place)

    # --- faults ----------------------------------------------------------------------------------

    def crash(self, peer_id: str) -> None:
        node = self._by_id[peer_id]
        if not node.up:
            return
        node.up = False
        for conn in list(node._conns.values()):
            self._close(conn)
        for scope in list(node._tasks):
            scope.cancel()

    def restart(self, peer_id: str) -> None:
        self._by_id[peer_id].up = True

    def partition(self, *groups: Iterable[str]) -> None:
        group: dict[str, int] = {}
        for i, members in enumerate(groups, start=1):
            for peer_id in members:
                group[peer_id] = i
        self._group = group
        for node in self._nodes:
            for conn in list(node._conns.values()):
                if conn.alive and not self._reachable(conn.a, conn.b):
                    self._close(conn)

    def heal(self) -> None:
        self._group = None

    def _reachable(self, a: "SimNode", b: "SimNode") -> bool:
        if not (a.up and b.up):
            return False
        return self._group is None or self._group.get(a.peer_id, 0) == self._group.get(b.peer_id, 0)

    def _close(self, conn: _Connection) -> None:
        """Tear a connection down on both sides: streams reset, listeners told."""
        if not conn.alive:
            return
        conn.alive = False
        for stream in list(conn.streams):
            stream._reset()
        for node in (conn.a, conn.b):
            other = conn.other(node)
            if node._conns.get(other.peer_id) is conn:
                del node._conns[other.peer_id]
                node._notify(other.peer_id, False)

    def _open(self, a: "SimNode", b: "SimNode") -> _Connection:
        conn = _Connection(a, b)
        a._conns[b.peer_id] = conn
        b._conns[a.peer_id] = conn
        a._book[b.peer_id] = b.addr
        b._book[a.peer_id] = a.addr
        a._notify(b.peer_id, True)
        b._notify(a.peer_id, True)
        return conn

    # --- delivery --------------------------------------------------------------------------------

    def _send(self, src: "SimNode", dst: "SimNode", size: int, lossy: bool, callback: Callable[..., None],
              *args: Any, not_before: float = 0.0) -> float | None:
        """Account one message from `src` and schedule `callback(*args)` at its arrival; None if lost."""
        self.messages_sent[src.peer_id] += 1
        self.bytes_sent[src.peer_id] += size
        self.total_messages += 1
        self.total_bytes += size
        sent_at = trio.current_time()
        if self.bandwidth_bps:
            # The sender's uplink puts out one message at a time.
            sent_at = src._uplink_free_at = max(sent_at, src._uplink_free_at) + size * 8 / self.bandwidth_bps
        at = sent_at + self.latency.one_way(src.place, dst.place)
        if self.loss and self._rng.random() < self.loss:
            if lossy:
                self.messages_dropped += 1
                return None
            at += self.latency.rtt(src.place, dst.place)  # reliable transport: one retransmit later
        at = max(at, not_before)
        if self.resolution:
            at = math.ceil(at / self.resolution) * self.resolution
        self._schedule(at, callback, *args)
        return at

    def _schedule(self, at: float, callback: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), callback, args))
        if self._sleep is not None and at < self._sleep.deadline:
            self._sleep.deadline = at

    def _add_timeout(self, at: float, waiter: _Waiter) -> None:
        heapq.heappush(self._timeouts, (at, next(self._seq), waiter))
        if self._sleep is not None and at < self._sleep.deadline:
            self._sleep.deadline = at

    async def _scheduler(self) -> None:
        heap, timeouts = self._heap, self._timeouts
        while True:
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, callback, args = heapq.heappop(heap)
                callback(*args)
            # Answered waiters leave stale timeouts behind; drop them without waking up for them.
            while timeouts and (timeouts[0][2].task is None or timeouts[0][0] <= now):
                _wake(heapq.heappop(timeouts)[2])
            wake_at = min(heap[0][0] if heap else math.inf, timeouts[0][0] if timeouts else math.inf)
            with trio.CancelScope(deadline=wake_at) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None

    def _spawn(self, node: "SimNode", fn: Callable[..., Any], *args: Any) -> None:
        """Run `fn(*args)` in its own task, cancelled if `node` crashes."""
        assert self._nursery is not None, "use `async with SimWorld.open() as world`"
        self._nursery.start_soon(self._guarded, node, fn, args, name=fn.__qualname__)

    @staticmethod
    async def _guarded(node: "SimNode", fn: Callable[..., Any], args: tuple) -> None:
        with trio.CancelScope() as scope:
            node._tasks.add(scope)
            try:
                await fn(*args)
            finally:
                node._tasks.discard(scope)


class SimNode(Network):
    """One simulated peer; implements `Network`."""

    def __init__(self, world: SimWorld, identity: Identity, place: Place, index: int):
        self.world = world
        self.identity = identity
        self.place = place
        self.index = index
        self.addr = f"/sim/{index}/p2p/{identity.peer_id}"
        self.up = True
        self._conns: dict[str, _Connection] = {}
        self._book: dict[str, str] = {}
        self._listeners: list[ConnectionListener] = []
        self._handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._dialing: dict[str, _Pending] = {}
        self._tasks: set[trio.CancelScope] = set()
        self._uplink_free_at = 0.0

    def __repr__(self) -> str:
        return f"SimNode({self.index}, {self.peer_id[-8:]}{'' if self.up else ', down'})"

    # --- addresses and connections ---------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        return [self.addr]

    def add_address(self, peer_id: str, addr: str) -> None:
        self._book[peer_id] = addr

    def address_of(self, peer_id: str) -> str | None:
        return self._book.get(peer_id)

    def connected_peers(self) -> list[str]:
        return list(self._conns)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def _notify(self, peer_id: str, connected: bool) -> None:
        for listener in self._listeners:
            try:
                listener(peer_id, connected)
            except Exception:
                log.exception("connection listener failed")

    async def connect(self, addr: str, timeout: float = 5.0) -> str:
        target = self._resolve(addr)
        await self._dial(target, trio.current_time() + timeout)
        return target.peer_id

    async def disconnect(self, peer_id: str) -> None:
        conn = self._conns.get(peer_id)
        if conn is not None:
            self.world._close(conn)

    def _resolve(self, addr: str) -> "SimNode":
        parts = addr.split("/") if isinstance(addr, str) else []
        # "/sim/<index>/p2p/<peer id>" splits into ["", "sim", index, "p2p", peer id]
        if len(parts) != 5 or parts[0] or parts[1] != "sim" or parts[3] != "p2p" or not parts[2].isdigit():
            raise PeerUnreachable(f"not a simulator address: {str(addr)[:100]!r}")
        index = int(parts[2])
        if index >= len(self.world._nodes) or self.world._nodes[index].peer_id != parts[4]:
            raise PeerUnreachable(f"no peer at {addr}")
        target = self.world._nodes[index]
        if target is self:
            raise PeerUnreachable("cannot dial oneself")
        return target

    async def _dial(self, target: "SimNode", deadline: float) -> _Connection:
        """The connection to `target`, dialling it (one RTT) if there is none. Joins a dial in progress."""
        conn = self._conns.get(target.peer_id)
        if conn is not None:
            await trio.lowlevel.checkpoint()
            return conn
        pending = self._dialing.get(target.peer_id)
        if pending is None:
            pending = self._dialing[target.peer_id] = _Pending()
            if self.up:
                self.world._send(self, target, 0, True, self._dial_arrived, target, pending)
        try:
            return await pending.wait(self.world, deadline, f"dial {target.peer_id}")
        finally:
            # A dial whose packets were lost never answers: the next caller must start a fresh one.
            if self._dialing.get(target.peer_id) is pending:
                del self._dialing[target.peer_id]

    def _dial_arrived(self, target: "SimNode", pending: _Pending) -> None:
        if self.world._reachable(self, target):
            self.world._send(target, self, 0, True, self._dial_answered, target, pending)

    def _dial_answered(self, target: "SimNode", pending: _Pending) -> None:
        if self._dialing.get(target.peer_id) is pending:
            del self._dialing[target.peer_id]
        if not self.world._reachable(self, target):
            return
        conn = self._conns.get(target.peer_id) or self.world._open(self, target)
        pending.resolve(conn)

    async def _connection_to(self, peer_id: str, deadline: float) -> _Connection:
        conn = self._conns.get(peer_id)
        if conn is not None:
            return conn
        addr = self._book.get(peer_id)
        if addr is None:
            raise PeerUnreachable(f"no address known for peer {peer_id}")
        return await self._dial(self._resolve(addr), deadline)

    # --- requests --------------------------------------------------------------------------------

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._handlers[protocol] = handler

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def request(self, peer_id: str, protocol: str, body: Any, timeout: float = DEFAULT_REQUEST_TIMEOUT) -> Any:
        payload = framing.encode(body)
        deadline = trio.current_time() + timeout
        conn = await self._connection_to(peer_id, deadline)
        pending = _Pending()
        if self.up:
            target = conn.other(self)
            self.world._send(self, target, len(payload), True, target._request_arrived, conn, self.peer_id,
                             protocol, payload, pending)
        return await pending.wait(self.world, deadline, f"{protocol} request to {peer_id}")

    def _request_arrived(self, conn: _Connection, sender: str, protocol: str, payload: bytes, pending: _Pending) -> None:
        if not conn.alive:
            return
        handler = self._handlers.get(protocol)
        if handler is None:
            self._reply(conn, 0, pending, None, ProtocolNotSupported(f"peer {self.peer_id} does not serve {protocol}"))
        else:
            self.world._spawn(self, self._serve_request, handler, conn, sender, protocol, payload, pending)

    async def _serve_request(self, handler: RequestHandler, conn: _Connection, sender: str, protocol: str,
                             payload: bytes, pending: _Pending) -> None:
        try:
            reply = framing.encode(await handler(sender, framing.decode(payload)))
        except Exception as e:  # the handler's failure is the caller's answer, as on the wire
            message = str(e)[:MAX_REMOTE_ERROR_LEN]
            self._reply(conn, 64 + len(message), pending, None, RemoteError(protocol, type(e).__name__, message))
        else:
            self._reply(conn, len(reply), pending, reply, None)

    def _reply(self, conn: _Connection, size: int, pending: _Pending, reply: bytes | None, error: Exception | None) -> None:
        if conn.alive and self.up:
            self.world._send(self, conn.other(self), size, True, _reply_arrived, conn, pending, reply, error)

    # --- streams ---------------------------------------------------------------------------------

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        deadline = trio.current_time() + DEFAULT_REQUEST_TIMEOUT
        conn = await self._connection_to(peer_id, deadline)
        local = SimStream(self, conn, peer_id, protocol)
        pending = _Pending()
        if self.up:
            target = conn.other(self)
            self.world._send(self, target, len(protocol), False, target._stream_arrived, conn, local, pending)
        await pending.wait(self.world, deadline, f"open {protocol} stream to {peer_id}")
        return local

    def _stream_arrived(self, conn: _Connection, remote: "SimStream", pending: _Pending) -> None:
        if not conn.alive:
            return
        handler = self._stream_handlers.get(remote.protocol)
        if handler is None:
            error = ProtocolNotSupported(f"peer {self.peer_id} does not serve {remote.protocol}")
            self.world._send(self, conn.other(self), 0, False, _reply_arrived, conn, pending, None, error)
            return
        local = SimStream(self, conn, remote.node.peer_id, remote.protocol)
        local._peer, remote._peer = remote, local
        self.world._send(self, conn.other(self), 0, False, _reply_arrived, conn, pending, None, None)
        self.world._spawn(self, self._serve_stream, handler, local)

    async def _serve_stream(self, handler: StreamHandler, stream: "SimStream") -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("stream handler for %s failed", stream.protocol)
        finally:
            await stream.aclose()

    # --- time ------------------------------------------------------------------------------------

    def now(self) -> float:
        return EPOCH + trio.current_time()


def _reply_arrived(conn: _Connection, pending: _Pending, reply: bytes | None, error: Exception | None) -> None:
    if conn.alive:
        pending.resolve(None if reply is None else framing.decode(reply), error)


class SimStream(Stream):
    """One end of an in-memory stream: ordered, reliable while its connection lives, reset when it dies."""

    def __init__(self, node: SimNode, conn: _Connection, peer_id: str, protocol: str):
        self.node = node
        self.peer_id = peer_id
        self.protocol = protocol
        self._conn = conn
        self._peer: SimStream | None = None  # the other end, once the open was accepted
        self._inbox: deque[bytes] = deque()
        self._arrival = trio.Event()
        self._sent_closed = False  # we closed: no more sends
        self._got_closed = False  # they closed: receive ends after the inbox drains
        self._was_reset = False
        self._last_at = 0.0  # arrival time of our latest message, to keep jittered delays in order
        conn.streams.add(self)

    async def send(self, message: Any) -> None:
        self._check_open()
        payload = framing.encode(message)
        self._transmit(len(payload), payload)
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._was_reset or not self._conn.alive:
            raise StreamClosed(f"{self.protocol} stream to {self.peer_id} was reset")
        if self._sent_closed or self._got_closed:
            raise StreamClosed(f"{self.protocol} stream to {self.peer_id} is closed")

    def _transmit(self, size: int, payload: bytes | None) -> None:
        """Send a message (payload None = end of stream) after everything sent before it."""
        peer = self._peer
        if peer is None or not self.node.up:
            return
        at = self.node.world._send(self.node, peer.node, size, False, peer._arrived, payload, not_before=self._last_at)
        self._last_at = at or self._last_at

    def _arrived(self, payload: bytes | None) -> None:
        if self._was_reset or not self._conn.alive or self._sent_closed:
            return  # closing closes both directions: what arrives after is discarded
        if payload is None:
            self._got_closed = True
        else:
            self._inbox.append(payload)
        self._arrival.set()

    async def receive(self) -> Any:
        while not self._inbox:
            if self._got_closed and not self._was_reset:
                raise StreamClosed(f"{self.protocol} stream to {self.peer_id} ended")
            self._check_open()
            if self._arrival.is_set():
                self._arrival = trio.Event()
            await self._arrival.wait()
        payload = self._inbox.popleft()
        await trio.lowlevel.checkpoint()
        return framing.decode(payload)

    async def aclose(self) -> None:
        if not self._sent_closed:
            self._sent_closed = True
            self._inbox.clear()
            if not (self._was_reset or self._got_closed) and self._conn.alive:
                self._transmit(0, None)
            self._conn.streams.discard(self)
        await trio.lowlevel.checkpoint()

    def _reset(self) -> None:
        self._was_reset = True
        self._inbox.clear()
        self._arrival.set()

