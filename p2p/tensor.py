"""Tensors on the wire: raw little-endian bytes + dtype + shape, never pickle.

`pack` takes a numpy array (or anything with the same interface); `unpack` validates the dtype
name, the shape, and that the byte length equals dtype size × number of elements before it builds
anything. bfloat16 travels as its raw 2-byte words and comes back as uint16 words with
dtype "bfloat16" recorded, for torch to reinterpret.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import FrameError
from .framing import brief, expect_map, field

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
MAX_DIMS = 8
MAX_TENSOR_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class WireTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def numpy(self) -> np.ndarray:
        """A read-only array over the bytes; bfloat16 comes as uint16 words."""
        np_dtype = np.dtype("<u2") if self.dtype == "bfloat16" else np.dtype(self.dtype).newbyteorder("<")
        return np.frombuffer(self.data, dtype=np_dtype).reshape(self.shape)


def pack(array: np.ndarray, dtype: str | None = None) -> dict:
    """Wire form of `array`. Pass dtype="bfloat16" with uint16 words to send bfloat16."""
    name = dtype or str(array.dtype)
    if name not in ITEMSIZE:
        raise FrameError(f"dtype {name} cannot travel; allowed: {sorted(ITEMSIZE)}")
    data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"dtype": name, "shape": list(array.shape), "data": data}


def unpack(msg: object, *, dtype: str | None = None, shape: tuple[int | None, ...] | None = None) -> WireTensor:
    """Validate a wire tensor; `dtype`/`shape` (None = any size on that axis) pin what the caller accepts."""
    m = expect_map(msg, "tensor")
    name = field(m, "dtype", str, max_len=16)
    dims = field(m, "shape", list, max_len=MAX_DIMS)
    data = field(m, "data", bytes)
    if name not in ITEMSIZE:
        raise FrameError(f"tensor dtype {name!r} is not allowed; allowed: {sorted(ITEMSIZE)}")
    if dtype is not None and name != dtype:
        raise FrameError(f"tensor dtype is {name}, expected {dtype}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in dims):
        raise FrameError(f"tensor shape must be non-negative integers, got {', '.join(brief(d, 20) for d in dims)}")
    if shape is not None:
        if len(dims) != len(shape) or any(want is not None and want != got for want, got in zip(shape, dims)):
            raise FrameError(f"tensor shape {dims} does not match expected {list(shape)}")
    expected = math.prod(dims) * ITEMSIZE[name]
    if expected > MAX_TENSOR_BYTES:
        raise FrameError(f"tensor of {expected} bytes exceeds the limit of {MAX_TENSOR_BYTES}")
    if len(data) != expected:
        raise FrameError(f"tensor has {len(data)} bytes but dtype {name} × shape {dims} needs {expected}")
    return WireTensor(name, tuple(dims), data)
