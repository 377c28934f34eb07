import numpy as np
import pytest
import trio

from p2p import framing, tensor
from p2p.errors import FrameError, FrameTooLarge, StreamClosed


def test_frame_roundtrip():
    msg = {"a": 1, "b": [b"x", "y", None, 1.5], 3: True}
    data = framing.frame(msg)
    assert framing.parse_header(data[:4]) == len(data) - 4
    assert framing.decode(data[4:]) == msg


def test_limits_are_checked_before_the_body():
    with pytest.raises(FrameTooLarge):
        framing.parse_header((2**31).to_bytes(4, "big"), max_size=1024)
    with pytest.raises(FrameTooLarge):
        framing.encode(b"x" * 2000, max_size=1024)


@pytest.mark.parametrize("body", [b"\xc1", b"\x92\x01", b"\x81\xa1a", b"\xc7\x01\x05x", b"\x01\x02"])
def test_bad_bodies_are_frame_errors(body):
    with pytest.raises(FrameError):
        framing.decode(body)


async def test_exact_reader_survives_many_partial_reads_and_reports_truncation():
    data = framing.frame({"k": b"v" * 5000})
    chunks = [data[i:i + 7] for i in range(0, len(data), 7)] + [b""]  # > 100 partial reads

    async def read_some(n):
        await trio.lowlevel.checkpoint()
        return chunks.pop(0)

    reader = framing.ExactReader(read_some)
    assert await framing.read_frame(reader.read_exactly) == {"k": b"v" * 5000}
    truncated = [data[:10], b""]

    async def read_truncated(n):
        return truncated.pop(0)

    with pytest.raises(StreamClosed, match="after 6 of"):
        await framing.read_frame(framing.ExactReader(read_truncated).read_exactly)


def test_field_checks_types_and_sizes():
    msg = {"n": 3, "s": "abc", "flag": True}
    assert framing.field(msg, "n", int) == 3
    with pytest.raises(FrameError, match="must be str"):
        framing.field(msg, "n", str)
    with pytest.raises(FrameError, match="bool"):
        framing.field(msg, "flag", int)
    with pytest.raises(FrameError, match="too long"):
        framing.field(msg, "s", str, max_len=2)
    with pytest.raises(FrameError, match="missing"):
        framing.field(msg, "zz", int)
    assert framing.field(msg, "zz", int, optional=True) is None


def test_tensor_roundtrip_and_validation():
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    wire = framing.decode(framing.encode(tensor.pack(x)))
    t = tensor.unpack(wire, dtype="float32", shape=(2, None, 4))
    np.testing.assert_array_equal(t.numpy(), x)
    with pytest.raises(FrameError, match="needs 96"):
        tensor.unpack({**wire, "data": wire["data"][:-1]})
    with pytest.raises(FrameError, match="expected float16"):
        tensor.unpack(wire, dtype="float16")
    with pytest.raises(FrameError, match="does not match"):
        tensor.unpack(wire, shape=(2, 3, 5))
    with pytest.raises(FrameError, match="not allowed"):
        tensor.unpack({**wire, "dtype": "object"})
    with pytest.raises(FrameError, match="non-negative"):
        tensor.unpack({**wire, "shape": [-1, 3, 4]})
    with pytest.raises(FrameError, match="exceeds"):
        tensor.unpack({**wire, "shape": [2**30, 2**30]})
