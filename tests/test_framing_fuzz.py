"""Hypothesis fuzzing of the wire decoders: on any input they return a value or raise FrameError.

(`read_frame` may also raise StreamClosed, and only when the input ends before the frame does.)
"""

from __future__ import annotations

import struct

import msgpack
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import framing, tensor
from p2p.errors import FrameError, StreamClosed

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(-5, 5)), children, max_size=5),
    ),
    max_leaves=20,
)



@FUZZ
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes(data):
    try:
        framing.decode(data)
    except FrameError:
        pass


@FUZZ
@given(values)
def test_decode_roundtrips_what_encode_makes(value):
    assert framing.decode(framing.encode(value)) == value


@FUZZ
@given(st.lists(values, max_size=4), st.binary(max_size=8))
def test_decode_mutated_valid_frames(parts, noise):
    body = framing.encode(parts)
    for i in range(0, len(body), max(1, len(body) // 8)):
        mutated = body[:i] + noise + body[i + len(noise):]
        try:
            framing.decode(mutated)
        except FrameError:
            pass


async def _read_all_frames(data: bytes, chunk: int, max_size: int) -> None:
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

    async def read_some(n):
        await trio.lowlevel.checkpoint()
        return chunks.pop(0) if chunks else b""

    reader = framing.ExactReader(read_some)
    consumed = 0
    while True:
        try:
            header = await reader.read_exactly(framing.HEADER_SIZE)
        except StreamClosed:
            return
        length = framing.parse_header(header, max_size)  # may raise FrameTooLarge (a FrameError)
        consumed += framing.HEADER_SIZE
        try:
            framing.decode(await reader.read_exactly(length))
        except StreamClosed:
            assert consumed + length > len(data)  # only a truncated input ends a frame early
            raise
        consumed += length


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 64), st.sampled_from([16, 256, framing.DEFAULT_MAX_FRAME]))
def test_read_frame_over_arbitrary_bytes(data, chunk, max_size):
    async def main():
        try:
            await _read_all_frames(data, chunk, max_size)
        except (FrameError, StreamClosed):
            pass

    trio.run(main)


@FUZZ
@given(st.lists(values, min_size=1, max_size=4), st.integers(1, 64), st.integers(0, 40))
def test_read_frame_over_valid_then_cut_streams(messages, chunk, cut):
    data = b"".join(framing.frame(m) for m in messages)
    data = data[: max(0, len(data) - cut)]

    async def main():
        chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)]

        async def read_some(n):
            await trio.lowlevel.checkpoint()
            return chunks.pop(0) if chunks else b""

        reader = framing.ExactReader(read_some)
        got = []
        try:
            while True:
                got.append(await framing.read_frame(reader.read_exactly))
        except StreamClosed:
            pass
        assert got == messages[: len(got)]
        if cut == 0:
            assert got == messages

    trio.run(main)


dtypes = st.one_of(st.sampled_from(sorted(tensor.ITEMSIZE)), st.text(max_size=20))
shapes = st.one_of(
    st.lists(st.integers(0, 8), max_size=4),
    st.lists(st.one_of(st.integers(-(2**40), 2**40), st.booleans(), st.floats(), st.text(max_size=3)), max_size=10),
)
tensor_maps = st.fixed_dictionaries(
    {},
    optional={"dtype": st.one_of(dtypes, values), "shape": st.one_of(shapes, values),
              "data": st.one_of(st.binary(max_size=600), values)},
)


@FUZZ
@given(st.one_of(tensor_maps, values),
       st.one_of(st.none(), st.sampled_from(sorted(tensor.ITEMSIZE))),
       st.one_of(st.none(), st.lists(st.one_of(st.none(), st.integers(0, 8)), max_size=4).map(tuple)))
def test_tensor_unpack_arbitrary_maps(msg, dtype, shape):
    # go through msgpack as a peer's message would
    decoded = framing.decode(msgpack.packb(msg, use_bin_type=True))
    try:
        t = tensor.unpack(decoded, dtype=dtype, shape=shape)
    except FrameError:
        return
    arr = t.numpy()  # whatever unpack accepts must be a consistent array
    assert tuple(arr.shape) == t.shape and arr.nbytes == len(t.data)


@FUZZ
@given(st.sampled_from(sorted(tensor.ITEMSIZE)), st.lists(st.integers(0, 5), max_size=3), st.integers(-3, 3))
def test_tensor_byte_length_must_match(dtype, shape, delta):
    n = 1
    for d in shape:
        n *= d
    data = b"\x00" * max(0, n * tensor.ITEMSIZE[dtype] + delta)
    msg = {"dtype": dtype, "shape": shape, "data": data}
    try:
        t = tensor.unpack(msg)
    except FrameError as e:
        assert len(data) != n * tensor.ITEMSIZE[dtype]
        assert "needs" in str(e)
        return
    assert len(t.data) == n * tensor.ITEMSIZE[dtype]


def test_header_limit_is_checked_before_reading():
    async def main():
        calls = []

        async def read_some(n):
            calls.append(n)
            return struct.pack(">I", 2**31) if len(calls) == 1 else b"x" * n

        reader = framing.ExactReader(read_some)
        try:
            await framing.read_frame(reader.read_exactly, max_size=1024)
        except framing.FrameTooLarge:
            pass
        else:
            raise AssertionError("expected FrameTooLarge")
        assert len(calls) == 1  # the body was never read

    trio.run(main)
