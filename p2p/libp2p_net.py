"""The real-socket backend of `p2p.network.Network`: a py-libp2p host with TCP + Noise + yamux.

What travels on a connection
----------------------------
Only ONE libp2p protocol id is registered, `/potluck/1.0.0` (identify, identify-push and ping, which
py-libp2p's BasicHost serves by default and which would tell any outsider our listen addresses and
protocol list, are removed). Every libp2p stream starts with one of two frames (`p2p.framing`):

- `{"t": "hello", ...}` opens a *session*: the gate handshake (below), then the stream stays open for
  the life of the connection and carries every request/response between the two peers, in both
  directions, multiplexed by id: `{"q": id, "p": protocol, "b": body}` → `{"a": id, "b": body}` or
  `{"a": id, "e": kind, "m": message}`; `{"c": id}` cancels a request whose caller gave up. Opening a
  libp2p stream costs a multistream-select round trip (5–8 ms), so requests never open one.
- `{"t": "open", "p": "/potluck/NAME/x.y.z"}` opens a long-lived message stream (`open_stream`); the
  acceptor answers `{"t": "ok"}` or `{"t": "refuse", "e": kind, "m": why}`.

The inner protocol name travels inside our frames, so an outsider that lists libp2p protocols
learns only that this is a potluck peer. Streams are served only to peers that completed the
session handshake ("admitted" peers); anything else is reset.

Relaying (peers behind NAT) is `p2p.relay`: circuit relay v2, whose two libp2p protocols are
registered only where asked for (`relay_service=True`: `/libp2p/circuit/relay/0.2.0/hop`;
`relays=[...]`: `/libp2p/circuit/relay/0.2.0/stop`), and which serves only admitted peers. A
circuit address `<relay>/p2p/R/p2p-circuit/p2p/T` names peer T (the last /p2p/); dialing it first
makes a libp2p connection to T through R, then runs the session handshake on it as on any other.

Hostile input
-------------
Every frame's length is checked before its body is read, bodies must arrive within `frame_timeout`
once announced, and every frame is decoded strictly and shape-checked. A malformed frame on a session
stream drops that peer (with a logged reason and a best-effort goodbye frame `{"x": reason}`); other
peers are unaffected. Each session has one reader task that always drains the stream (so a busy
handler never leaves the sender waiting for yamux window updates, which py-libp2p turns into a
stream reset after 5 s); each request runs in its own task; in-flight requests are bounded per peer
in both directions, and inbound also in bytes (excess inbound requests are answered `Overloaded` at
once, so a peer cannot make us hold more than `max_inflight_bytes_in` of its requests).

Long-lived streams and slow consumers
-------------------------------------
A background task per stream drains yamux into a message buffer, so yamux windows never stall.
The buffer is bounded by credit-based flow control: a sender may have at most `stream_window`
bytes (plus one frame) unacknowledged; the receiver grants credit back (`[1, n]` frames) as its
consumer takes messages. A consumer that does not read for minutes makes the sender's `send` wait,
never reset. Data frames are `[0, message]`.

Private swarms: why our own gate and not libp2p pnet
----------------------------------------------------
py-libp2p 0.8.1's pnet hangs about 30 s on a key mismatch (and more than 40 s when the listener has no
key) before failing, and uses Salsa20 with an 8-byte nonce, so it does not interoperate with the
go/js/rust pnet (XSalsa20). Instead, the first exchange on every session is a challenge/response:
both sides send fresh 32-byte nonces, then each proves the key with
HMAC-SHA256(key, label ‖ role ‖ nonce_dialer ‖ nonce_listener ‖ id_dialer ‖ id_listener). The peer ids
are the ones Noise authenticated for this connection, so a proof cannot be relayed to a third peer,
and the fresh nonces stop replays. A peer that fails, or does not finish within `gate_timeout`
(2 s), is disconnected before anything else is served to it; the dialer's `connect` raises
`SwarmKeyMismatch` with what to do. The key protects membership, not secrecy of the traffic from
members; Noise still encrypts everything on the wire.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import multiaddr
import trio

import libp2p  # noqa: F401  (configures libp2p logging at import; we override it below)
import libp2p.network.swarm as _libp2p_swarm
from libp2p import new_swarm
from libp2p.abc import INotifee
from libp2p.crypto import ed25519 as _ed25519
from libp2p.crypto import x25519 as _x25519
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost, _IdentifyNotifee
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
import libp2p.stream_muxer.yamux.yamux as _yamux
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH as _NOISE_MAX_PLAINTEXT
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from . import framing
from .errors import (
    FrameError,
    P2PError,
    PeerUnreachable,
    ProtocolNotSupported,
    RemoteError,
    RequestTimeout,
    StreamClosed,
    SwarmKeyMismatch,
)
from .framing import ExactReader, expect_map, field
from .identity import Identity
from .network import DEFAULT_REQUEST_TIMEOUT, ConnectionListener, Network, RequestHandler, Stream, StreamHandler
from .relay import CircuitRelay, RelayLimits, split_circuit

log = logging.getLogger(__name__)

# --- py-libp2p 0.8.1 workarounds (see shared/notes/py-libp2p-0.8.1.md) ----------------------------
# Every dial waited the full 250 ms "happy eyeballs" head start even with a single address.
_libp2p_swarm._HAPPY_EYEBALLS_DELAY = 0.005
# libp2p sets its loggers up at import; keep them quiet unless the application asks otherwise.
for _name in ("libp2p", "libp2p.network.auto_connector"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)
# yamux sends DATA frames of 64 KiB (12-byte header + 65524 bytes), one byte-run more than a Noise
# message carries (65535 - 16 byte tag = 65519), so every full frame became two Noise messages: two
# encryptions, two socket writes, two reads and decryptions on the other side. Sizing frames to one
# Noise message is within the yamux spec (frames may be any size up to the window) and gave +25 %
# bulk throughput (bench.hop). Only frames this process sends are affected.
_yamux.MAX_MESSAGE_SIZE = _NOISE_MAX_PLAINTEXT
# py-libp2p's yamux sends a WINDOW_UPDATE after every read by default ("release on read", a local
# deviation it lets you switch off with PY_YAMUX_RELEASE_ON_READ=0). With it off, the receiver
# batches credit like go-yamux (an update once half the window is consumed), which halves the frames
# of a small request/response. Safe for us because every stream we own is drained continuously, so
# the half-window threshold is always reached while a sender waits.
_yamux._yamux_release_on_read = lambda: False
# The swarm's handler for an inbound connection, once the connection is up, waits for the whole
# swarm to stop ("keep the handler alive so the connection stays open"). So every inbound connection
# left a task behind after it closed, and held one of the swarm's 250 inbound slots (released when
# the handler returns) for the peer's lifetime: a long-running peer ended up refusing every new
# inbound connection. Wait for that connection to close instead.
_upgraded_inbound: contextvars.ContextVar[tuple[list, trio.Event]] = contextvars.ContextVar("potluck_upgraded_inbound")
_upgrade_inbound = _libp2p_swarm.Swarm.upgrade_inbound_raw_conn
_handle_inbound = _libp2p_swarm.Swarm._do_handle_inbound_connection


async def _upgrade_inbound_noted(self: Any, raw_conn: Any, maddr: Any) -> Any:
    muxed = await _upgrade_inbound(self, raw_conn, maddr)
    noted = _upgraded_inbound.get(None)
    if noted is not None:
        noted[0].append(muxed)
        noted[1].set()
    return muxed


async def _handle_inbound_until_closed(self: Any, read_write_closer: Any, maddr: Any, failure_event: Any) -> None:
    upgraded: list[Any] = []
    done = trio.Event()
    _upgraded_inbound.set((upgraded, done))  # the handler task below starts with a copy of this context

    async def handle() -> None:
        await _handle_inbound(self, read_write_closer, maddr, failure_event)
        nursery.cancel_scope.cancel()  # it returned on its own: failed upgrade, or the swarm stopped

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle)
        await done.wait()  # the upgrade (Noise + yamux) is bounded by libp2p's own timeout
        await upgraded[0].event_closed.wait()
        nursery.cancel_scope.cancel()


_libp2p_swarm.Swarm.upgrade_inbound_raw_conn = _upgrade_inbound_noted  # type: ignore[method-assign]
_libp2p_swarm.Swarm._do_handle_inbound_connection = _handle_inbound_until_closed  # type: ignore[method-assign]

LIBP2P_PROTOCOL = TProtocol("/potluck/1.0.0")
WIRE_VERSION = 1
NONCE_SIZE = 32
MAX_PROTOCOL_LEN = 200
MAX_ERROR_LEN = 2000
_PROOF_LABEL = b"potluck swarm key proof v1\x00"


def _proof(key: bytes, role: bytes, nonce_d: bytes, nonce_l: bytes, dialer: str, listener: str) -> bytes:
    msg = b"".join([_PROOF_LABEL, role, b"\x00", nonce_d, nonce_l, dialer.encode(), b"\x00", listener.encode()])
    return hmac.new(key, msg, hashlib.sha256).digest()


def _mismatch_message(peer_id: str, ours: bool, theirs: bool) -> str:
    if ours and theirs:
        return (f"peer {peer_id} is in a different private swarm: the swarm keys differ. "
                "Start this peer with the same swarm key file as that swarm's members (--swarm-key FILE).")
    if ours:
        return (f"peer {peer_id} is not in a private swarm (it has no swarm key) but this peer has one. "
                "Give both peers the same swarm key file (--swarm-key FILE), or neither.")
    return (f"peer {peer_id} belongs to a private swarm and this peer has no swarm key. "
            "Start this peer with that swarm's key file (--swarm-key FILE).")


def _unwrap_group(exc: BaseException) -> BaseException:
    """The single leaf of nested ExceptionGroups (host.run() nests them), or the group itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _fast(raw: Any) -> Any:
    """The yamux stream under a libp2p NetStream. NetStream.read/write only add a trio.Lock round on
    a state flag per call; closing and resetting still go through the NetStream (`raw`)."""
    return getattr(raw, "muxed_stream", raw)


def _read_some(raw: Any):
    read = _fast(raw).read

    async def read_some(n: int) -> bytes:
        try:
            return await read(n)
        except trio.Cancelled:
            raise
        except EOFError:  # libp2p StreamEOF
            return b""
        except Exception as e:  # StreamReset / StreamError / anything from a dying connection
            raise StreamClosed(f"stream reset ({type(e).__name__})") from None

    return read_some


async def _write(raw: Any, data: bytes) -> None:
    try:
        await _fast(raw).write(data)
    except trio.Cancelled:
        raise
    except Exception as e:
        raise StreamClosed(f"cannot write: stream {type(e).__name__}") from None


async def _read_frame(reader: ExactReader, max_size: int, frame_timeout: float) -> Any:
    """One frame; waits any time for a header, then at most `frame_timeout` for the announced body."""
    length = framing.parse_header(await reader.read_exactly(framing.HEADER_SIZE), max_size)
    return await _read_body(reader, length, frame_timeout)


async def _read_body(reader: ExactReader, length: int, frame_timeout: float) -> Any:
    try:
        with trio.fail_after(frame_timeout):
            body = await reader.read_exactly(length)
    except trio.TooSlowError:
        raise FrameError(f"frame body of {length} bytes did not arrive within {frame_timeout:g} s") from None
    except StreamClosed as e:
        raise FrameError(f"truncated frame: {e}") from None
    return framing.decode(body)


async def _reset(raw: Any) -> None:
    with trio.move_on_after(1.0, shield=True):  # type: ignore[call-arg]  # stale trio-typing stub
        try:
            await raw.reset()
        except Exception:
            pass


async def _close(raw: Any) -> None:
    with trio.move_on_after(1.0, shield=True):  # type: ignore[call-arg]  # stale trio-typing stub
        try:
            await raw.close()
        except Exception:
            pass


def _peer_of(raw: Any) -> str:
    return raw.muxed_conn.peer_id.to_base58()


def _check_id(value: Any, what: str = "id") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise FrameError(f"{what} must be a non-negative 63-bit integer")
    return value


class _Pending:
    __slots__ = ("event", "ok", "value", "kind", "message")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.ok = False
        self.value: Any = None
        self.kind = ""
        self.message = ""


class _Session:
    """One admitted peer's request/response channel: a single long-lived libp2p stream."""

    def __init__(self, net: "Libp2pNetwork", peer_id: str, raw: Any, reader: ExactReader):
        self.net = net
        self.peer_id = peer_id
        self.raw = raw
        self.reader = reader
        self.write_lock = trio.Lock()
        self.pending: dict[int, _Pending] = {}
        self.ids = itertools.count(1)
        self.out_slots = trio.Semaphore(net.max_inflight_out)
        self.inbound: dict[int, trio.CancelScope] = {}
        self.inbound_sizes: dict[int, int] = {}  # frame bytes of each request being served
        self.inbound_bytes = 0
        self.closed = False
        self.close_reason = ""
        self.done = trio.Event()

    # --- sending ------------------------------------------------------------------------------------

    async def send(self, obj: Any) -> None:
        data = framing.frame(obj, self.net.max_frame)
        await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise StreamClosed(f"connection to {self.peer_id} closed: {self.close_reason}")
        async with self.write_lock:
            await _write(self.raw, data)

    async def request(self, protocol: str, body: Any) -> Any:
        async with self.out_slots:
            rid = next(self.ids)
            data = framing.frame({"q": rid, "p": protocol, "b": body}, self.net.max_frame)
            pending = _Pending()
            self.pending[rid] = pending
            try:
                await self.send_bytes(data)
                await pending.event.wait()
            finally:
                self.pending.pop(rid, None)
                if not pending.event.is_set() and not self.closed:
                    self.net._spawn(self._send_quietly, {"c": rid})
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
        net = self.net
        reason = "stream closed"
        try:
            while True:
                length = framing.parse_header(await self.reader.read_exactly(framing.HEADER_SIZE), net.max_frame)
                m = expect_map(await _read_body(self.reader, length, net.frame_timeout), "session frame")
                if "a" in m:
                    rid = _check_id(m["a"])
                    if "e" in m:
                        kind = field(m, "e", str, max_len=100)
                        message = field(m, "m", str, max_len=MAX_ERROR_LEN)
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
                    if rid in self.inbound:
                        raise FrameError(f"request id {rid} reused while still in flight")
                    if len(self.inbound) >= net.max_inflight_in:
                        net._spawn(self._send_quietly, {"a": rid, "e": "Overloaded",
                                                        "m": f"more than {net.max_inflight_in} requests in flight"})
                        continue
                    if self.inbound and self.inbound_bytes + length > net.max_inflight_bytes_in:
                        # (one request is always taken, however big: max_frame bounds it)
                        net._spawn(self._send_quietly, {"a": rid, "e": "Overloaded", "m": (
                            f"more than {net.max_inflight_bytes_in} bytes of requests in flight")})
                        continue
                    scope = trio.CancelScope()
                    self.inbound[rid] = scope
                    self.inbound_sizes[rid] = length
                    self.inbound_bytes += length
                    net._spawn(self._serve, rid, protocol, m.get("b"), scope)
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
            self.net._spawn(self.net._drop_peer, self.peer_id)
        except Exception as e:  # never let one peer's session take anything else down
            reason = f"internal error: {type(e).__name__}: {e}"
            log.exception("session with %s failed", self.peer_id)
        finally:
            self._finish(reason)
            with trio.CancelScope(shield=True):
                await _reset(self.raw)

    async def _goodbye(self, reason: str) -> None:
        try:
            with trio.move_on_after(0.5):
                await self.send({"x": reason[:300]})
        except P2PError:
            pass

    def _finish(self, reason: str) -> None:
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
        self.done.set()
        self.net._session_ended(self)

    async def close(self, reason: str = "closed") -> None:
        self._finish(reason)
        await _reset(self.raw)

    async def _serve(self, rid: int, protocol: str, body: Any, scope: trio.CancelScope) -> None:
        reply: dict
        try:
            with scope:
                handler = self.net._request_handlers.get(protocol)
                if handler is None:
                    reply = {"a": rid, "e": "ProtocolNotSupported", "m": f"no handler for {protocol}"}
                else:
                    try:
                        result = await handler(self.peer_id, body)
                        reply = {"a": rid, "b": result}
                    except Exception as e:
                        if not isinstance(e, P2PError):
                            log.debug("handler for %s failed", protocol, exc_info=True)
                        reply = {"a": rid, "e": type(e).__name__, "m": str(e)[:MAX_ERROR_LEN]}
            if scope.cancelled_caught:
                return  # the caller gave up (or the session ended): nobody waits for an answer
            try:
                data = framing.frame(reply, self.net.max_frame)
            except FrameError as e:
                data = framing.frame({"a": rid, "e": type(e).__name__, "m": f"reply cannot be sent: {e}"})
            try:
                await self.send_bytes(data)
            except StreamClosed:
                pass
        finally:
            self.inbound.pop(rid, None)
            self.inbound_bytes -= self.inbound_sizes.pop(rid, 0)


class _Libp2pStream(Stream):
    """A long-lived message stream with credit-based flow control (see the module docstring)."""

    def __init__(self, net: "Libp2pNetwork", raw: Any, reader: ExactReader, peer_id: str, protocol: str):
        self.net = net
        self.raw = raw
        self.reader = reader
        self.peer_id = peer_id
        self.protocol = protocol
        self._window = net.stream_window
        self._credit = self._window  # bytes we may still send before the peer grants more
        self._credit_event = trio.Event()
        self._inbox: deque[tuple[Any, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_event = trio.Event()
        self._consumed = 0  # bytes taken by our consumer and not yet granted back
        self._write_lock = trio.Lock()
        self._end: tuple[type[P2PError], str] | None = None  # why no more messages will come
        self._closed = False
        self._eof = trio.Event()

    async def _drain(self) -> None:
        """Read frames into the inbox until the stream ends; never raises."""
        net = self.net
        limit = self._window + net.max_frame + framing.HEADER_SIZE
        try:
            while True:
                length = framing.parse_header(await self.reader.read_exactly(framing.HEADER_SIZE), net.max_frame)
                msg = await _read_body(self.reader, length, net.frame_timeout)
                if not isinstance(msg, list) or len(msg) != 2 or msg[0] not in (0, 1) or isinstance(msg[0], bool):
                    raise FrameError("stream frame must be [0, message] or [1, credit]")
                if msg[0] == 1:
                    credit = msg[1]
                    if not isinstance(credit, int) or isinstance(credit, bool) or not 0 < credit <= 2**40:
                        raise FrameError("stream credit must be a positive integer")
                    self._credit += credit
                    self._credit_event.set()
                    self._credit_event = trio.Event()
                    continue
                if self._closed:
                    continue  # we closed: discard until the peer's end of stream
                size = framing.HEADER_SIZE + length
                self._inbox.append((msg[1], size))
                self._inbox_bytes += size
                if self._inbox_bytes > limit:
                    raise FrameError(f"peer sent {self._inbox_bytes} bytes past the flow-control window of {self._window}")
                self._inbox_event.set()
        except StreamClosed as e:
            reason = str(e)
            self._end = (StreamClosed, "stream closed by peer" if reason == "stream closed" else reason)
        except FrameError as e:
            log.warning("stream %s from %s dropped: %s", self.protocol, self.peer_id, e)
            self._end = (type(e), f"malformed frame from {self.peer_id}: {e}")
            await _reset(self.raw)
        except Exception as e:
            log.exception("stream %s with %s failed", self.protocol, self.peer_id)
            self._end = (StreamClosed, f"internal error: {type(e).__name__}")
            await _reset(self.raw)
        finally:
            self._eof.set()
            self._inbox_event.set()
            self._credit_event.set()

    async def send(self, message: Any) -> None:
        if self._closed:
            raise StreamClosed(f"stream {self.protocol} to {self.peer_id} was closed by us")
        data = framing.frame([0, message], self.net.max_frame)
        async with self._write_lock:  # keeps frames whole and in order
            while True:
                if self._end is not None:  # the peer closed (or broke) the stream: nobody reads on
                    raise StreamClosed(self._end[1])
                if self._closed:
                    raise StreamClosed(f"stream {self.protocol} to {self.peer_id} was closed by us")
                if self._credit > 0:
                    break
                await self._credit_event.wait()
            self._credit -= len(data)
            await _write(self.raw, data)

    async def receive(self) -> Any:
        while not self._inbox:
            if self._end is not None:
                cls, message = self._end
                raise cls(message)
            if self._closed:
                raise StreamClosed(f"stream {self.protocol} was closed by us")
            self._inbox_event = trio.Event()
            await self._inbox_event.wait()
        message, size = self._inbox.popleft()
        self._inbox_bytes -= size
        self._consumed += size
        if self._consumed >= self._window // 4 and self._end is None and not self._closed:
            grant, self._consumed = self._consumed, 0
            try:
                async with self._write_lock:
                    await _write(self.raw, framing.frame([1, grant]))
            except StreamClosed:
                pass
        return message

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.clear()
        self._inbox_event.set()
        self._credit_event.set()
        with trio.CancelScope(shield=True):
            # Half-close: what we sent is delivered, then the peer reads end-of-stream. Our drain task
            # keeps reading (and discarding) until the peer closes too, or resets after a grace time.
            await _close(self.raw)
        self.net._spawn(self._linger)

    async def _linger(self) -> None:
        with trio.move_on_after(self.net.linger):
            await self._eof.wait()
            return
        await _reset(self.raw)


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
        max_inflight_in: int = 64,
        max_inflight_bytes_in: int = 64 * 1024 * 1024,
        max_inflight_out: int = 64,
        max_streams_in: int = 64,
        stream_window: int = 4 * 1024 * 1024,
        linger: float = 10.0,
        relay_service: bool = False,
        relays: list[str] | None = None,
        relay_limits: RelayLimits | None = None,
        relay_timeout: float = 10.0,
    ):
        if swarm_key is not None and (not isinstance(swarm_key, bytes) or len(swarm_key) < 16):
            raise ValueError("a swarm key is at least 16 bytes (load it with p2p.swarm_key.load_key)")
        self.identity = identity
        self.swarm_key = swarm_key
        self.max_frame = max_frame
        self.gate_timeout = gate_timeout if swarm_key is not None else hello_timeout
        self.frame_timeout = frame_timeout
        self.max_inflight_in = max_inflight_in
        self.max_inflight_bytes_in = max_inflight_bytes_in
        self.max_inflight_out = max_inflight_out
        self.max_streams_in = max_streams_in
        self.stream_window = stream_window
        self.linger = linger
        self._request_handlers: dict[str, RequestHandler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._listeners: list[ConnectionListener] = []
        self._book: dict[str, str] = {}
        self._sessions: dict[str, list[_Session]] = {}
        self._streams_in: dict[str, int] = {}
        self._dial_locks: dict[str, trio.Lock] = {}
        self._implicit_dials: dict[str, tuple[trio.Event, list[BaseException]]] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = False

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
        assert isinstance(swarm, _libp2p_swarm.Swarm)  # typed as the interface; we use the Swarm's own parts

        # The auto-connector re-dials peers it finds in the peerstore when below a watermark of 100
        # connections; we decide whom to dial (and must not re-dial peers we dropped).
        async def _no_auto_connect() -> None:
            return None

        swarm.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[method-assign]
        self._host = BasicHost(swarm, default_protocols=OrderedDict([(LIBP2P_PROTOCOL, self._on_libp2p_stream)]))
        # BasicHost runs identify against every new connection and pushes identify (with our protocol
        # list and addresses) to peers; with no identify handler registered that is only wasted streams.
        swarm.notifees = [n for n in swarm.notifees if not isinstance(n, _IdentifyNotifee)]
        self._host._schedule_identify = lambda *args, **kwargs: None  # type: ignore[method-assign]
        swarm.register_notifee(_Notifee(self))
        self._swarm = swarm
        # Circuit relay v2 (p2p.relay): dialing circuit addresses always works; the relay service and
        # reservations on relays only when asked for (each registers one more libp2p protocol).
        self._relay = CircuitRelay(self, service=relay_service, relays=relays, limits=relay_limits,
                                   timeout=relay_timeout)
        self.relay_dial_timeout = max(15.0, relay_timeout)

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

        Relaying (see `p2p.relay`), as keyword options:
        - `relay_service=True`: serve circuit relay v2 to admitted peers: a publicly reachable member
          lets members behind NAT reserve a slot and be dialled through it.
        - `relays=[multiaddr, ...]`: this peer is behind NAT: reserve a slot on each of these relay
          services (kept refreshed, re-made after the relay's connection drops) and announce
          `<relay addr>/p2p-circuit/p2p/<our id>` first in `listen_addrs()`. `open` waits up to
          `relay_timeout` (10 s) for the first reservations; it raises `SwarmKeyMismatch` or
          `p2p.relay.RelayRefused` when every relay refused us, and otherwise keeps retrying the
          missing ones in the background.
        - `relay_limits=p2p.relay.RelayLimits(...)`: what a relay service grants.
        """
        addrs = [multiaddr.Multiaddr(a) for a in (listen_addrs or ["/ip4/127.0.0.1/tcp/0"])]
        net = cls(identity, swarm_key, **options)
        try:
            async with trio.open_nursery() as nursery:
                net._nursery = nursery
                try:
                    async with net._host.run(listen_addrs=addrs):
                        try:
                            await net._relay.start(nursery)
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
                        s._finish("network shutting down")
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

    def _spawn(self, fn: Any, *args: Any) -> None:
        if self._nursery is not None and not self._closing:
            self._nursery.start_soon(fn, *args)

    # --- addresses and connections ------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Our addresses through relays we hold a reservation on (first: behind NAT they are the ones
        others can dial), then the addresses we listen on."""
        return [*self._relay.circuit_addrs(), *self.direct_addrs()]

    def direct_addrs(self) -> list[str]:
        """The addresses we listen on (with /p2p/<id>), without circuit addresses."""
        return [str(a) for a in self._host.get_addrs()]

    def relay_status(self) -> dict:
        """Reservations held and served, circuits, bytes relayed (for status pages)."""
        return self._relay.relay_status()

    def now(self) -> float:
        return time.time()

    def add_address(self, peer_id: str, addr: str) -> None:
        addr = self._full_addr(addr, peer_id)
        self._book[peer_id] = addr

    def address_of(self, peer_id: str) -> str | None:
        return self._book.get(peer_id)

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def connected_peers(self) -> list[str]:
        return [p for p, sessions in self._sessions.items() if sessions]

    @staticmethod
    def _full_addr(addr: str, peer_id: str | None = None) -> str:
        """`addr` ending in /p2p/<peer id> (appended when missing). For a circuit address
        (`<relay addr>/p2p/<relay id>/p2p-circuit/p2p/<peer id>`) the peer is the last /p2p/."""
        try:
            ma = multiaddr.Multiaddr(addr)
        except Exception as e:
            raise PeerUnreachable(f"not a multiaddr: {addr[:120]!r} ({e})") from None
        circuit = split_circuit(str(ma))
        if circuit is not None:
            found = circuit[1]
            addr = str(ma).rstrip("/")
        else:
            try:
                found = ma.value_for_protocol("p2p")
            except Exception:
                found = None
        if not found:
            if peer_id is None:
                raise PeerUnreachable(f"address {addr} lacks /p2p/<peer id>")
            return f"{addr}/p2p/{peer_id}"
        if peer_id is not None and found != peer_id:
            raise PeerUnreachable(f"address {addr} names peer {found}, not {peer_id}")
        return addr

    def _session(self, peer_id: str) -> _Session | None:
        for s in reversed(self._sessions.get(peer_id, ())):
            if not s.closed:
                return s
        return None

    async def connect(self, addr: str, timeout: float = 5.0) -> str:
        full = self._full_addr(addr)
        ma = multiaddr.Multiaddr(full)
        peer_id = full.rsplit("/p2p/", 1)[1]
        if peer_id == self.peer_id:
            raise PeerUnreachable("cannot connect to ourselves")
        self._book.setdefault(peer_id, full)
        if self._session(peer_id) is not None:
            return peer_id
        lock = self._dial_locks.setdefault(peer_id, trio.Lock())
        try:
            with trio.fail_after(timeout):
                async with lock:
                    if self._session(peer_id) is not None:
                        return peer_id
                    await self._dial(peer_id, ma)
        except trio.TooSlowError:
            raise RequestTimeout(f"connecting to {peer_id} took longer than {timeout:g} s") from None
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._dial_locks.pop(peer_id, None)
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
                    # A circuit: the relay connects us (p2p.relay); the connection then lives in the
                    # swarm like a direct one, and our session handshake runs on it unchanged.
                    if not self._swarm.get_connections(pid):
                        await self._relay.dial(str(ma), peer_id)
                else:
                    await self._host.connect(PeerInfo(pid, [transport]))
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
            await _reset(raw)
            with trio.CancelScope(shield=True):
                await self._disconnect_quietly(peer_id)
            raise
        self._admit(session)
        self._spawn(session.run)

    async def _handshake_as_dialer(self, peer_id: str, raw: Any) -> _Session:
        reader = ExactReader(_read_some(raw))
        key = self.swarm_key
        nonce_d = secrets.token_bytes(NONCE_SIZE)
        try:
            with trio.fail_after(self.gate_timeout):
                await _write(raw, framing.frame({"t": "hello", "v": WIRE_VERSION, "n": nonce_d, "k": key is not None}))
                reply = expect_map(await _read_frame(reader, 4096, self.gate_timeout), "hello reply")
                kind = field(reply, "t", str, max_len=16)
                if kind == "refuse":
                    self._raise_refusal(peer_id, reply)
                if kind != "hello":
                    raise FrameError(f"expected hello, got {kind!r}")
                nonce_l = field(reply, "n", bytes, max_len=NONCE_SIZE)
                theirs = field(reply, "k", bool)
                if len(nonce_l) != NONCE_SIZE:
                    raise FrameError("hello nonce has the wrong size")
                if theirs != (key is not None):
                    raise SwarmKeyMismatch(_mismatch_message(peer_id, key is not None, theirs))
                proof_d = None
                if key is not None:
                    proof_l = field(reply, "p", bytes, max_len=64)
                    expected = _proof(key, b"listener", nonce_d, nonce_l, self.peer_id, peer_id)
                    if not hmac.compare_digest(proof_l, expected):
                        raise SwarmKeyMismatch(_mismatch_message(peer_id, True, True))
                    proof_d = _proof(key, b"dialer", nonce_d, nonce_l, self.peer_id, peer_id)
                await _write(raw, framing.frame({"t": "proof", "p": proof_d}))
                final = expect_map(await _read_frame(reader, 4096, self.gate_timeout), "handshake result")
                kind = field(final, "t", str, max_len=16)
                if kind == "refuse":
                    self._raise_refusal(peer_id, final)
                if kind != "welcome":
                    raise FrameError(f"expected welcome, got {kind!r}")
        except trio.TooSlowError:
            if key is not None:
                raise SwarmKeyMismatch(
                    f"peer {peer_id} did not complete the swarm key handshake within {self.gate_timeout:g} s; "
                    "it may not be a potluck peer of this private swarm") from None
            raise RequestTimeout(f"peer {peer_id} did not complete the handshake within {self.gate_timeout:g} s") from None
        except FrameError as e:
            raise PeerUnreachable(f"peer {peer_id} broke the handshake: {e}") from None
        except StreamClosed as e:
            if key is not None:
                raise SwarmKeyMismatch(
                    f"peer {peer_id} closed the connection during the swarm key handshake ({e}); "
                    "the swarm keys probably differ: use the swarm's key file (--swarm-key FILE)") from None
            raise PeerUnreachable(f"peer {peer_id} closed the connection during the handshake: {e}") from None
        return _Session(self, peer_id, raw, reader)

    @staticmethod
    def _raise_refusal(peer_id: str, msg: dict) -> None:
        kind = field(msg, "e", str, max_len=100)
        message = field(msg, "m", str, max_len=MAX_ERROR_LEN)
        if kind == "SwarmKeyMismatch":
            raise SwarmKeyMismatch(message)
        raise PeerUnreachable(f"peer {peer_id} refused the connection: {kind}: {message}")

    async def _handshake_as_listener(self, peer_id: str, raw: Any, reader: ExactReader, hello: dict) -> _Session | None:
        key = self.swarm_key
        version = field(hello, "v", int)
        nonce_d = field(hello, "n", bytes, max_len=NONCE_SIZE)
        theirs = field(hello, "k", bool)
        if len(nonce_d) != NONCE_SIZE:
            raise FrameError("hello nonce has the wrong size")
        if version != WIRE_VERSION:
            await _write(raw, framing.frame({"t": "refuse", "e": "VersionMismatch",
                                             "m": f"this peer speaks wire version {WIRE_VERSION}, not {version}"}))
            return None
        if theirs != (key is not None):
            # Say only what the dialer needs to fix its configuration: nothing about us or our swarm.
            await _write(raw, framing.frame({"t": "refuse", "e": "SwarmKeyMismatch",
                                             "m": _mismatch_message(self.peer_id, theirs, key is not None)}))
            log.info("refused %s: swarm key %s", peer_id, "missing" if key else "unexpected")
            return None
        nonce_l = secrets.token_bytes(NONCE_SIZE)
        proof_l = _proof(key, b"listener", nonce_d, nonce_l, peer_id, self.peer_id) if key is not None else None
        await _write(raw, framing.frame({"t": "hello", "v": WIRE_VERSION, "n": nonce_l, "k": key is not None, "p": proof_l}))
        answer = expect_map(await _read_frame(reader, 4096, self.gate_timeout), "proof")
        if field(answer, "t", str, max_len=16) != "proof":
            raise FrameError("expected the swarm key proof")
        if key is not None:
            proof_d = field(answer, "p", bytes, max_len=64)
            if not hmac.compare_digest(proof_d, _proof(key, b"dialer", nonce_d, nonce_l, peer_id, self.peer_id)):
                await _write(raw, framing.frame({"t": "refuse", "e": "SwarmKeyMismatch",
                                                 "m": _mismatch_message(self.peer_id, True, True)}))
                log.info("refused %s: wrong swarm key proof", peer_id)
                return None
        await _write(raw, framing.frame({"t": "welcome"}))
        return _Session(self, peer_id, raw, reader)

    def _admit(self, session: _Session) -> None:
        sessions = self._sessions.setdefault(session.peer_id, [])
        first = not any(not s.closed for s in sessions)
        sessions.append(session)
        if first:
            self._notify(session.peer_id, True)

    def _session_ended(self, session: _Session) -> None:
        sessions = self._sessions.get(session.peer_id)
        if not sessions or session not in sessions:
            return
        sessions.remove(session)
        if not sessions:
            del self._sessions[session.peer_id]
            self._notify(session.peer_id, False)
            self._close_sessionless(session.peer_id)

    def _notify(self, peer_id: str, connected: bool) -> None:
        for listener in list(self._listeners):
            try:
                listener(peer_id, connected)
            except Exception:
                log.exception("connection listener failed")

    def _on_connection(self, conn: Any) -> None:
        self._spawn(self._gate_watchdog, conn)

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
            s._finish("connection closed")

    def _close_sessionless(self, peer_id: str) -> None:
        """Close the connections to a peer we hold no session with (they serve nothing), so both sides
        agree. Only those open now: the peer may dial back before the close runs, and closing by peer
        id would take the new connection down with the old."""
        conns = list(self._swarm.get_connections(ID.from_base58(peer_id)))
        if conns:
            self._spawn(self._close_connections, conns)

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

    async def _drop_peer(self, peer_id: str) -> None:
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
            peer_id = _peer_of(raw)
        except Exception:
            await _reset(raw)
            return
        reader = ExactReader(_read_some(raw))
        try:
            with trio.fail_after(self.gate_timeout):
                first = expect_map(await _read_frame(reader, 4096, self.gate_timeout), "first frame")
                kind = field(first, "t", str, max_len=16)
                if kind == "hello":
                    if len(self._sessions.get(peer_id, ())) >= 4:
                        raise FrameError("too many sessions")
                    session = await self._handshake_as_listener(peer_id, raw, reader, first)
                elif kind == "open":
                    session = None
                    protocol = field(first, "p", str, max_len=MAX_PROTOCOL_LEN)
                else:
                    raise FrameError(f"unknown stream kind {kind!r}")
        except (FrameError, trio.TooSlowError) as e:
            why = "no first frame in time" if isinstance(e, trio.TooSlowError) else str(e)
            log.info("refused a stream from %s: %s", peer_id, why)
            await _reset(raw)
            if self._session(peer_id) is None:
                self._close_sessionless(peer_id)
            return
        except StreamClosed:
            await _reset(raw)
            return
        if kind == "hello":
            if session is None:
                await _close(raw)
                self._close_sessionless(peer_id)
                return
            self._admit(session)
            await session.run()
            return
        await self._serve_stream(peer_id, raw, reader, protocol)

    async def _refuse(self, raw: Any, kind: str, message: str) -> None:
        try:
            with trio.move_on_after(1.0):
                await _write(raw, framing.frame({"t": "refuse", "e": kind, "m": message}))
        except StreamClosed:
            pass
        await _close(raw)

    async def _serve_stream(self, peer_id: str, raw: Any, reader: ExactReader, protocol: str) -> None:
        if self._session(peer_id) is None:
            log.info("refused stream %s from unadmitted peer %s", protocol, peer_id)
            await _reset(raw)
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
        stream = _Libp2pStream(self, raw, reader, peer_id, protocol)
        try:
            await _write(raw, framing.frame({"t": "ok"}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream._drain)
                try:
                    await handler(stream)
                except P2PError as e:
                    log.info("stream handler %s for %s ended: %s", protocol, peer_id, e)
                except Exception:
                    log.exception("stream handler %s failed", protocol)
                    await _reset(raw)
                finally:
                    await stream.aclose()
                # Let the drain task finish on the peer's end of stream (bounded by linger).
                with trio.move_on_after(self.linger):
                    await stream._eof.wait()
                nursery.cancel_scope.cancel()
        except StreamClosed:
            pass
        finally:
            self._streams_in[peer_id] -= 1
            if not self._streams_in[peer_id]:
                del self._streams_in[peer_id]
            if not (stream._closed and stream._eof.is_set()):  # not a clean close both ways
                await _reset(raw)

    # --- protocols ----------------------------------------------------------------------------------

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        self._request_handlers[protocol] = handler

    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        self._stream_handlers[protocol] = handler

    async def _ensure_session(self, peer_id: str) -> _Session:
        session = self._session(peer_id)
        if session is not None:
            return session
        addr = self._book.get(peer_id)
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
        try:
            raw = await self._host.new_stream(ID.from_base58(peer_id), [LIBP2P_PROTOCOL])
        except trio.Cancelled:
            raise
        except Exception as e:
            raise PeerUnreachable(f"cannot open a stream to {peer_id}: {type(e).__name__}: {e}"[:400]) from None
        reader = ExactReader(_read_some(raw))
        try:
            with trio.fail_after(self.gate_timeout + 3.0):
                await _write(raw, framing.frame({"t": "open", "p": protocol}))
                answer = expect_map(await _read_frame(reader, 4096, self.frame_timeout), "open reply")
                kind = field(answer, "t", str, max_len=16)
                if kind == "refuse":
                    what = field(answer, "e", str, max_len=100)
                    message = field(answer, "m", str, max_len=MAX_ERROR_LEN)
                    if what == "ProtocolNotSupported":
                        raise ProtocolNotSupported(f"peer {peer_id} does not serve {protocol}")
                    raise RemoteError(protocol, what, message)
                if kind != "ok":
                    raise FrameError(f"unexpected answer {kind!r} to open")
        except trio.TooSlowError:
            await _reset(raw)
            raise RequestTimeout(f"peer {peer_id} did not accept stream {protocol} in time") from None
        except BaseException:
            await _reset(raw)
            raise
        stream = _Libp2pStream(self, raw, reader, peer_id, protocol)
        if self._nursery is None or self._closing:
            await _reset(raw)
            raise StreamClosed("network is shutting down")
        self._nursery.start_soon(stream._drain)
        return stream
