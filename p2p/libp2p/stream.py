"""A long-lived message stream (`open_stream`) on one libp2p stream, with credit-based flow control.

The stream opens with `{"t": "open", "p": "/potluck/NAME/x.y.z"}`, which the acceptor answers with
`{"t": "ok"}` or `{"t": "refuse", "e": kind, "m": why}` (see `network`). Then every frame is
`[0, message]` (data) or `[1, n]` (n bytes of credit granted back).

A background task per stream (`drain`) reads yamux into a message buffer, so yamux windows never
stall. The buffer is bounded by flow control: a sender may have at most `stream_window` bytes (plus
one frame) unacknowledged; the receiver grants credit back as its consumer takes messages. A consumer
that does not read for minutes makes the sender's `send` wait, never reset.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Awaitable, Callable, Protocol

import trio

from .. import framing
from ..errors import FrameError, P2PError, StreamClosed
from ..framing import ExactReader
from ..network import Stream
from . import io

log = logging.getLogger(__name__)


class StreamOwner(Protocol):
    """What a stream needs of its network: limits and a place to run its linger task."""

    max_frame: int
    frame_timeout: float
    decoder: io.FrameDecoder
    stream_window: int
    linger: float

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """Run `fn(*args)` in the network's nursery (nothing once the network is closing)."""


class FlowControlledStream(Stream):
    """One end of a long-lived message stream; `drain` must run for as long as the stream lives."""

    def __init__(self, owner: StreamOwner, raw: Any, reader: ExactReader, peer_id: str, protocol: str):
        self.owner = owner
        self.raw = raw
        self.reader = reader
        self.peer_id = peer_id
        self.protocol = protocol
        self._window = owner.stream_window
        self._credit = self._window  # bytes we may still send before the peer grants more
        self._credit_event = trio.Event()
        self._inbox: deque[tuple[Any, int]] = deque()
        self._inbox_bytes = 0
        self._inbox_event = trio.Event()
        self._consumed = 0  # bytes taken by our consumer and not yet granted back
        self._write_lock = trio.Lock()
        self._end: tuple[type[P2PError], str] | None = None  # why no more messages will come
        self._closed = False
        self.eof = trio.Event()  # set once `drain` has returned: the peer's end of stream (or a failure)

    @property
    def closed_both_ways(self) -> bool:
        """We closed and the peer's end of stream arrived: nothing is left to reset."""
        return self._closed and self.eof.is_set()

    async def drain(self) -> None:
        """Read frames into the inbox until the stream ends; never raises."""
        owner = self.owner
        limit = self._window + owner.max_frame + framing.HEADER_SIZE
        try:
            while True:
                length = framing.parse_header(await self.reader.read_exactly(framing.HEADER_SIZE), owner.max_frame)
                msg = await io.read_body(self.reader, length, owner.frame_timeout, owner.decoder)
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
            await io.reset(self.raw)
        except Exception as e:
            log.exception("stream %s with %s failed", self.protocol, self.peer_id)
            self._end = (StreamClosed, f"internal error: {type(e).__name__}")
            await io.reset(self.raw)
        finally:
            self.eof.set()
            self._inbox_event.set()
            self._credit_event.set()

    async def send(self, message: Any) -> None:
        if self._closed:
            raise StreamClosed(f"stream {self.protocol} to {self.peer_id} was closed by us")
        data = framing.frame([0, message], self.owner.max_frame)
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
            await io.write(self.raw, data)

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
                    await io.write(self.raw, framing.frame([1, grant]))
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
            await io.close(self.raw)
        self.owner.spawn(self._linger)

    async def _linger(self) -> None:
        with trio.move_on_after(self.owner.linger):
            await self.eof.wait()
            return
        await io.reset(self.raw)
