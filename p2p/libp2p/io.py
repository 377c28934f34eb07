"""Reading and writing frames on py-libp2p streams, with libp2p's errors turned into ours.

A libp2p stream here is whatever `host.new_stream` returns or a stream handler receives (a NetStream,
or a bare yamux stream): reads return up to n bytes (b'' at the end), and a dying connection raises
any of several libp2p exceptions, which become `StreamClosed`.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio

from .. import framing
from ..errors import FrameError, StreamClosed
from ..framing import ExactReader

MAX_OPENING_FRAME = 4096  # the first frames of a stream (hello, open) and their answers


class FrameDecoder:
    """Decodes frame bodies into at most `max_objects` objects (`framing.decode`); bodies longer than
    `off_loop_from` bytes are decoded in a worker thread, at most `threads` at a time, so that one
    big frame does not hold up every other task of the peer while it is built."""

    def __init__(self, max_objects: int = framing.DEFAULT_MAX_OBJECTS, off_loop_from: int = 256 * 1024,
                 threads: int = 2):
        self.max_objects = max_objects
        self.off_loop_from = off_loop_from
        self._threads = trio.CapacityLimiter(threads)

    async def __call__(self, body: bytes) -> Any:
        return (await self.counted(body, self.max_objects))[0]

    async def counted(self, body: bytes, count_from: int) -> tuple[Any, int]:
        """The message and how many objects it holds (`framing.decode_counted`)."""
        if len(body) <= self.off_loop_from:
            return framing.decode_counted(body, self.max_objects, count_from)
        return await trio.to_thread.run_sync(framing.decode_counted, body, self.max_objects, count_from,
                                             limiter=self._threads)


def _fast(raw: Any) -> Any:
    """The yamux stream under a libp2p NetStream. NetStream.read/write only add a trio.Lock round on
    a state flag per call; closing and resetting still go through the NetStream (`raw`)."""
    return getattr(raw, "muxed_stream", raw)


def _read_some(raw: Any) -> Callable[[int], Awaitable[bytes]]:
    """`read_some(n)` for an `ExactReader`: up to n bytes, b'' at the end, StreamClosed on a reset."""
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


def exact_reader(raw: Any) -> ExactReader:
    return ExactReader(_read_some(raw))


async def write(raw: Any, data: bytes) -> None:
    try:
        await _fast(raw).write(data)
    except trio.Cancelled:
        raise
    except Exception as e:
        raise StreamClosed(f"cannot write: stream {type(e).__name__}") from None


async def read_frame(reader: ExactReader, max_size: int, frame_timeout: float) -> Any:
    """One opening frame (`max_size` is at most MAX_OPENING_FRAME); waits any time for a header, then
    at most `frame_timeout` for the announced body."""
    length = framing.parse_header(await reader.read_exactly(framing.HEADER_SIZE), max_size)
    return framing.decode(await _read_body_bytes(reader, length, frame_timeout))  # small: on the loop


async def read_body(reader: ExactReader, length: int, frame_timeout: float, decode: FrameDecoder) -> Any:
    return await decode(await _read_body_bytes(reader, length, frame_timeout))


async def read_body_counted(reader: ExactReader, length: int, frame_timeout: float, decoder: FrameDecoder,
                            count_from: int) -> tuple[Any, int]:
    """`read_body`, and how many objects the message holds (`FrameDecoder.counted`)."""
    return await decoder.counted(await _read_body_bytes(reader, length, frame_timeout), count_from)


async def _read_body_bytes(reader: ExactReader, length: int, frame_timeout: float) -> bytes:
    try:
        with trio.fail_after(frame_timeout):
            return await reader.read_exactly(length)
    except trio.TooSlowError:
        raise FrameError(f"frame body of {length} bytes did not arrive within {frame_timeout:g} s") from None
    except StreamClosed as e:
        raise FrameError(f"truncated frame: {e}") from None


async def reset(raw: Any) -> None:
    """Reset the stream, best effort, within 1 s, even in a cancelled scope."""
    with trio.move_on_after(1.0, shield=True):  # type: ignore[call-arg]  # stale trio-typing stub
        try:
            await raw.reset()
        except Exception:
            pass


async def close(raw: Any) -> None:
    """Close a stream (half-close: what we sent is delivered) or a raw connection, best effort, within
    1 s, even in a cancelled scope."""
    with trio.move_on_after(1.0, shield=True):  # type: ignore[call-arg]  # stale trio-typing stub
        try:
            await raw.close()
        except Exception:
            pass


def peer_of(raw: Any) -> str:
    return raw.muxed_conn.peer_id.to_base58()
