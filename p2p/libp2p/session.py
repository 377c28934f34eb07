"""A request session: the one long-lived libp2p stream that carries every request between two peers.

A session starts with the gate handshake (`gate`) and then stays open for the life of the
connection, carrying requests and replies in both directions, multiplexed by id:
`{"q": id, "p": protocol, "b": body}` → `{"a": id, "b": body}` or `{"a": id, "e": kind, "m": message}`;
`{"c": id}` cancels a request whose caller gave up; `{"x": reason}` is a best-effort goodbye before
a peer drops the session for a protocol violation. Opening a libp2p stream costs a multistream-select
round trip (5–8 ms), so requests never open one.

Each session has one reader task that drains the stream without waiting on handlers (so a busy handler
never leaves the sender waiting for yamux window updates, which py-libp2p turns into a stream reset
after 5 s); each inbound request runs in its own task; in-flight requests are bounded per peer in both
directions, and inbound also in bytes (excess inbound requests are answered `Overloaded` at once, so a
peer cannot make us hold more than `max_inflight_bytes_in` of its requests). The one wait the reader
takes is the peer's request pace (`pace`): past it, the reader sleeps before it reads on, so a flood
costs us its rate, not its volume (an honest peer waits at most its requests in flight × 1/rate).
A request's bytes are what it costs us decoded: its frame plus `OBJECT_COST` per object it decoded
into (counted for frames over `COUNT_OBJECTS_FROM` bytes; a smaller one is charged as if every byte
were an object), so frames of empty arrays cannot hold 64× more memory than the budget says. A
malformed frame ends the session and drops the peer; other peers are unaffected.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Awaitable, Callable, Protocol

import trio

from .. import framing
from ..errors import FrameError, P2PError, ProtocolNotSupported, RemoteError, StreamClosed
from ..framing import ExactReader, expect_map, field
from ..network import MAX_REMOTE_ERROR_LEN, RequestHandler
from . import io
from .pace import RequestPace

log = logging.getLogger(__name__)

MAX_PROTOCOL_LEN = 200
OBJECT_COST = 64  # bytes a small decoded object costs: its header, and its slot in a list or map
COUNT_OBJECTS_FROM = 4096  # request frames longer than this are charged for the objects they hold


class SessionOwner(Protocol):
    """What a session needs of its network: limits, a place to run tasks, handlers, and to be told."""

    max_frame: int
    frame_timeout: float
    decoder: io.FrameDecoder
    max_inflight_in: int
    max_inflight_bytes_in: int
    max_inflight_out: int
    pace: RequestPace

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run `fn(*args)` in the network's nursery (nothing once the network is closing)."""

    def request_handler(self, protocol: str) -> RequestHandler | None: ...

    def session_ended(self, session: RequestSession) -> None: ...

    async def drop_peer(self, peer_id: str) -> None:
        """Close every session with the peer and its connections (it broke the protocol)."""


def _check_id(value: Any, what: str = "id") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise FrameError(f"{what} must be a non-negative 63-bit integer")
    return value


class _PendingReply:
    __slots__ = ("event", "ok", "value", "kind", "message")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.ok = False
        self.value: Any = None
        self.kind = ""
        self.message = ""


class RequestSession:
    """One admitted peer's request/response channel: a single long-lived libp2p stream."""

    def __init__(self, owner: SessionOwner, peer_id: str, raw: Any, reader: ExactReader):
        self.owner = owner
        self.peer_id = peer_id
        self.raw = raw
        self.reader = reader
        self.write_lock = trio.Lock()
        self.pending: dict[int, _PendingReply] = {}
        self.ids = itertools.count(1)
        self.out_slots = trio.Semaphore(owner.max_inflight_out)
        self.inbound: dict[int, trio.CancelScope] = {}
        self.inbound_sizes: dict[int, int] = {}  # decoded cost of each request being served
        self.inbound_bytes = 0
        self.closed = False
        self.close_reason = ""

    # --- sending ------------------------------------------------------------------------------------

    async def send(self, obj: Any) -> None:
        data = framing.frame(obj, self.owner.max_frame)
        await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise StreamClosed(f"connection to {self.peer_id} closed: {self.close_reason}")
        async with self.write_lock:
            await io.write(self.raw, data)

    async def request(self, protocol: str, body: Any) -> Any:
        async with self.out_slots:
            rid = next(self.ids)
            data = framing.frame({"q": rid, "p": protocol, "b": body}, self.owner.max_frame)
            pending = _PendingReply()
            self.pending[rid] = pending
            try:
                await self.send_bytes(data)
                await pending.event.wait()
            finally:
                self.pending.pop(rid, None)
                if not pending.event.is_set() and not self.closed:
                    self.owner.spawn(self._send_quietly, {"c": rid})
        if pending.ok:
            return pending.value
        if pending.kind == "_closed":
            raise StreamClosed(f"connection to {self.peer_id} closed before the reply: {pending.message}")
        if pending.kind == "ProtocolNotSupported":
            raise ProtocolNotSupported(f"peer {self.peer_id} does not serve {protocol}")
        raise RemoteError(protocol, pending.kind, pending.message)

    async def _send_quietly(self, obj: Any) -> None:
        try:
            with trio.move_on_after(5.0):
                await self.send(obj)
        except P2PError:
            pass

    # --- receiving ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Drain the stream until it ends; dispatch requests, match replies. Never raises."""
        owner = self.owner
        reason = "stream closed"
        try:
            while True:
                length = framing.parse_header(await self.reader.read_exactly(framing.HEADER_SIZE), owner.max_frame)
                # nothing of ours awaits a reply from this peer: the frame is a request (or junk), paced
                # before its body is read; a possible reply is read at once, a request in it paced after
                paced = not self.pending
                if paced and await self._wait_for_pace(length):
                    break
                m, objects = await io.read_body_counted(self.reader, length, owner.frame_timeout, owner.decoder,
                                                        COUNT_OBJECTS_FROM)
                m = expect_map(m, "session frame")
                if "a" in m:
                    rid = _check_id(m["a"])
                    if "e" in m:
                        kind = field(m, "e", str, max_len=100)
                        message = field(m, "m", str, max_len=MAX_REMOTE_ERROR_LEN)
                        pending = self.pending.get(rid)
                        if pending is not None and not pending.event.is_set():
                            pending.kind, pending.message = kind, message
                            pending.event.set()
                    else:
                        pending = self.pending.get(rid)
                        if pending is not None and not pending.event.is_set():
                            pending.ok, pending.value = True, m.get("b")
                            pending.event.set()
                elif "q" in m:
                    rid = _check_id(m["q"])
                    protocol = field(m, "p", str, max_len=MAX_PROTOCOL_LEN)
                    if not paced and await self._wait_for_pace(length):
                        break
                    if rid in self.inbound:
                        raise FrameError(f"request id {rid} reused while still in flight")
                    if len(self.inbound) >= owner.max_inflight_in:
                        owner.spawn(self._send_quietly, {"a": rid, "e": "Overloaded",
                                                         "m": f"more than {owner.max_inflight_in} requests in flight"})
                        continue
                    cost = length + OBJECT_COST * objects
                    if self.inbound and self.inbound_bytes + cost > owner.max_inflight_bytes_in:
                        # (one request is always taken, however big: max_frame bounds it)
                        owner.spawn(self._send_quietly, {"a": rid, "e": "Overloaded", "m": (
                            f"more than {owner.max_inflight_bytes_in} bytes of requests in flight")})
                        continue
                    scope = trio.CancelScope()
                    self.inbound[rid] = scope
                    self.inbound_sizes[rid] = cost
                    self.inbound_bytes += cost
                    owner.spawn(self._serve, rid, protocol, m.get("b"), scope)
                elif "c" in m:
                    running = self.inbound.get(_check_id(m["c"]))
                    if running is not None:
                        running.cancel()
                elif "x" in m:
                    reason = f"peer said goodbye: {str(m['x'])[:300]}"
                    log.warning("peer %s closed our session: %s", self.peer_id, reason)
                    break
                else:
                    raise FrameError(f"unknown session frame with keys {sorted(map(str, m))[:5]}")
        except StreamClosed as e:
            reason = str(e)
        except FrameError as e:
            reason = f"protocol violation: {e}"
            log.warning("dropping peer %s: %s", self.peer_id, e)
            await self._goodbye(str(e))
            owner.spawn(owner.drop_peer, self.peer_id)
        except Exception as e:  # never let one peer's session take anything else down
            reason = f"internal error: {type(e).__name__}: {e}"
            log.exception("session with %s failed", self.peer_id)
        finally:
            self.finish(reason)
            with trio.CancelScope(shield=True):
                await io.reset(self.raw)

    async def _wait_for_pace(self, length: int) -> bool:
        """Wait until a frame of `length` bytes is within the peer's pace (nothing more is read from the
        peer meanwhile: its sender feels it); whether the session closed in the meantime. A FrameError
        when the wait would be past `max_wait`: that peer is far beyond any honest pace."""
        pace = self.owner.pace
        wait = pace.delay(self.peer_id, length)
        if wait > pace.max_wait:
            raise FrameError(f"a frame of {length} bytes {wait:.0f} s past this peer's request pace")
        if wait:
            await trio.sleep(wait)
        return self.closed

    async def _goodbye(self, reason: str) -> None:
        try:
            with trio.move_on_after(0.5):
                await self.send({"x": reason[:300]})
        except P2PError:
            pass

    def finish(self, reason: str) -> None:
        """Mark the session closed: pending requests fail with `reason`, inbound ones are cancelled."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for pending in self.pending.values():
            if not pending.event.is_set():
                pending.kind, pending.message = "_closed", reason
                pending.event.set()
        for scope in self.inbound.values():
            scope.cancel()
        self.owner.session_ended(self)

    async def close(self, reason: str = "closed") -> None:
        self.finish(reason)
        await io.reset(self.raw)

    async def _serve(self, rid: int, protocol: str, body: Any, scope: trio.CancelScope) -> None:
        reply: dict
        try:
            with scope:
                handler = self.owner.request_handler(protocol)
                if handler is None:
                    reply = {"a": rid, "e": "ProtocolNotSupported", "m": f"no handler for {protocol}"}
                else:
                    try:
                        result = await handler(self.peer_id, body)
                        reply = {"a": rid, "b": result}
                    except Exception as e:
                        if not isinstance(e, P2PError):
                            log.debug("handler for %s failed", protocol, exc_info=True)
                        reply = {"a": rid, "e": type(e).__name__, "m": str(e)[:MAX_REMOTE_ERROR_LEN]}
            if scope.cancelled_caught:
                return  # the caller gave up (or the session ended): nobody waits for an answer
            try:
                data = framing.frame(reply, self.owner.max_frame)
            except FrameError as e:
                data = framing.frame({"a": rid, "e": type(e).__name__, "m": f"reply cannot be sent: {e}"})
            try:
                await self.send_bytes(data)
            except StreamClosed:
                pass
        finally:
            self.inbound.pop(rid, None)
            self.inbound_bytes -= self.inbound_sizes.pop(rid, 0)
