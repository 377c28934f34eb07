"""Length-prefixed msgpack frames.

A frame is a 4-byte big-endian length followed by that many bytes of msgpack. The length is checked
against the limit before any of the body is read, so a hostile prefix costs the reader nothing.
Decoding is strict: no extension types, bounded container sizes, and the result must be of the type
the protocol expects (`expect_*` helpers) before anyone uses it.

Decoding is bounded by what it builds, not only by bytes: a frame may decode into at most
`max_objects` Python objects (containers and their elements). Every object costs at least one byte
on the wire, so a body of at most `max_objects` bytes is decoded as it is; a longer one is decoded
with a hook on every container that counts elements and stops the decode once the budget is spent
(a 16 MiB frame of empty arrays would otherwise become 16 million lists, ~1 GB).
"""

from __future__ import annotations

import struct
from typing import Any, Awaitable, Callable

import msgpack

from .errors import FrameError, FrameTooLarge, StreamClosed

DEFAULT_MAX_FRAME = 16 * 1024 * 1024  # one frame; big payloads (tensors) stay well under this
DEFAULT_MAX_OBJECTS = 128 * 1024  # objects one frame may decode into: at most ~10 MB of Python objects
_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size


def encode(obj: Any, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    """Msgpack body of one frame (no prefix). Raises FrameTooLarge rather than send what the peer must refuse."""
    try:
        body = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise FrameError(f"cannot encode message: {e}") from None
    if len(body) > max_size:
        raise FrameTooLarge(f"message of {len(body)} bytes exceeds the frame limit of {max_size}")
    return body


def frame(obj: Any, max_size: int = DEFAULT_MAX_FRAME) -> bytes:
    body = encode(obj, max_size)
    return _HEADER.pack(len(body)) + body


class _ObjectBudget:
    """A msgpack list/map hook that counts what the decode has built and stops it past the budget."""

    __slots__ = ("left",)

    def __init__(self, max_objects: int):
        self.left = max_objects

    def __call__(self, container: Any) -> Any:
        self.left -= len(container) + 1
        if self.left < 0:
            raise _TooManyObjects
        return container


class _TooManyObjects(Exception):
    """Raised inside msgpack by `_ObjectBudget`; becomes a FrameError."""


def decode(body: bytes, max_objects: int = DEFAULT_MAX_OBJECTS) -> Any:
    """Decode one msgpack body strictly into at most `max_objects` objects; any defect is a FrameError."""
    return decode_counted(body, max_objects)[0]


def decode_counted(body: bytes, max_objects: int = DEFAULT_MAX_OBJECTS, count_from: int | None = None) -> tuple[Any, int]:
    """`decode`, and how many objects it built: counted for bodies longer than `count_from` bytes
    (by default `max_objects`, the shortest that needs counting), else `len(body)`, a bound on it."""
    count_from = max_objects if count_from is None else min(count_from, max_objects)
    budget = _ObjectBudget(max_objects)
    hooks: dict[str, Any] = {}
    if len(body) > count_from:  # shorter bodies cannot hold more objects than bytes
        hooks = {"list_hook": budget, "object_hook": budget}
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            use_list=True,
            strict_map_key=False,
            max_ext_len=0,
            max_array_len=max_objects,
            max_map_len=max_objects,  # str/bin lengths are bounded by len(body), their default
            **hooks,
        )
    except _TooManyObjects:
        raise FrameError(f"frame of {len(body)} bytes decodes into more than {max_objects} objects") from None
    except msgpack.ExtraData:
        raise FrameError("frame has trailing bytes after its msgpack body") from None
    except (ValueError, msgpack.UnpackException, UnicodeDecodeError, TypeError) as e:
        # TypeError: an unhashable map key, e.g. a list used as a key.
        raise FrameError(f"frame is not valid msgpack: {type(e).__name__}: {e}"[:300]) from None
    return obj, (max_objects - budget.left if hooks else len(body))


def parse_header(header: bytes, max_size: int = DEFAULT_MAX_FRAME) -> int:
    (length,) = _HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(f"peer announced a frame of {length} bytes; the limit is {max_size}")
    return length


async def read_frame(read_exactly: Callable[[int], Awaitable[bytes]], max_size: int = DEFAULT_MAX_FRAME) -> Any:
    """Read one frame through `read_exactly(n)`, which returns n bytes or raises StreamClosed."""
    length = parse_header(await read_exactly(HEADER_SIZE), max_size)
    return decode(await read_exactly(length))


class ExactReader:
    """Turns a `read_some(max) -> bytes` source (b'' at EOF) into exact reads, with no limit on partial reads."""

    def __init__(self, read_some: Callable[[int], Awaitable[bytes]]):
        self._read_some = read_some
        self._buf = bytearray()

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self._read_some(max(n - len(self._buf), 65536))
            if not chunk:
                got = len(self._buf)
                raise StreamClosed(f"stream ended after {got} of {n} bytes" if got else "stream closed")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


# --- shape checks for decoded messages ------------------------------------------------------------


def brief(value: Any, limit: int = 40) -> str:
    """An untrusted value, shown in at most about `limit` characters of an error message. Containers
    are shown by type and size: the repr of a deeply nested one would recurse past Python's limit."""
    if isinstance(value, (list, dict)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (str, bytes)):
        value = value[:limit]
    return repr(value)[:limit]


def expect_map(obj: Any, what: str = "message") -> dict:
    if not isinstance(obj, dict):
        raise FrameError(f"{what} must be a map, got {type(obj).__name__}")
    return obj


def field(msg: dict, name: str, kind: type | tuple[type, ...], *, max_len: int | None = None, optional: bool = False) -> Any:
    """`msg[name]`, checked to be of `kind` (and at most `max_len` long for bytes/str/list/dict)."""
    if name not in msg:
        if optional:
            return None
        raise FrameError(f"missing field {name!r}")
    value = msg[name]
    if value is None and optional:
        return None
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise FrameError(f"field {name!r} has type bool")
    if not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise FrameError(f"field {name!r} must be {want}, got {type(value).__name__}")
    if max_len is not None and hasattr(value, "__len__") and len(value) > max_len:
        raise FrameError(f"field {name!r} is too long ({len(value)} > {max_len})")
    return value
