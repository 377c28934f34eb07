"""Issue #13, the p2p/ part: a hostile peer cannot take an honest one down.

Each test stands for one attack a single stranger could make: frames that decode into millions of
objects, half-open connections from one address (slowloris), request floods, gossip floods.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID

from p2p import framing
from p2p.errors import FrameError, StreamClosed
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.network import LIBP2P_PROTOCOL

ECHO = "/potluck/echo/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@asynccontextmanager
async def peers(n: int, **options):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, **options))
               for _ in range(n)]


async def echo(peer_id, body):
    return body


def empty_arrays_body(size: int) -> bytes:
    """A valid msgpack body of `size` bytes: an array of (size - 5) empty arrays."""
    return b"\xdd" + struct.pack(">I", size - 5) + b"\x90" * (size - 5)


def nested_empty_arrays_body(size: int) -> bytes:
    """A valid msgpack body: arrays of 65535 empty arrays each, so no single container is long."""
    inner = b"\xdc\xff\xff" + b"\x90" * 0xFFFF
    n = size // len(inner)
    return b"\xdd" + struct.pack(">I", n) + inner * n


# --- decoding is bounded by what it builds ---------------------------------------------------------


@pytest.mark.parametrize("make", [empty_arrays_body, nested_empty_arrays_body])
def test_a_frame_of_empty_arrays_is_refused_quickly_and_builds_little(make):
    body = make(framing.DEFAULT_MAX_FRAME)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        with pytest.raises(FrameError, match="decodes into more than|exceeds max_array_len"):
            framing.decode(body)
        took = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded, this body became 16 million lists: ~1 GB and seconds of one CPU.
    assert peak < 32 * 1024 * 1024, peak
    assert took < 1.0, took


def test_legitimate_frames_decode_as_before():
    big = {"tensor": b"x" * (8 * 1024 * 1024), "ids": list(range(50_000)), "peers": [{"id": "p", "n": i} for i in range(1000)]}
    assert framing.decode(framing.encode(big)) == big
    with pytest.raises(FrameError, match="more than 10 objects"):
        framing.decode(framing.encode([[1]] * 6), max_objects=10)
    with pytest.raises(FrameError, match="more than 100 objects"):
        framing.decode(framing.encode([[1] * 20] * 20), max_objects=100)


async def test_a_peer_keeps_answering_while_sent_frames_of_empty_arrays():
    async with peers(3) as (server, hostile, friend):
        server.set_request_handler(ECHO, echo)
        await friend.connect(server.listen_addrs()[0])
        slowest = 0.0
        done = trio.Event()

        async def ping_all_along():
            nonlocal slowest
            while not done.is_set():
                started = trio.current_time()
                assert await friend.request(server.peer_id, ECHO, "ping", timeout=10) == "ping"
                slowest = max(slowest, trio.current_time() - started)
                await trio.sleep(0.02)

        payload = struct.pack(">I", framing.DEFAULT_MAX_FRAME) + nested_empty_arrays_body(framing.DEFAULT_MAX_FRAME)
        payload = struct.pack(">I", len(payload) - 4) + payload[4:]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ping_all_along)
            for _ in range(3):
                await hostile.connect(server.listen_addrs()[0])
                raw = await hostile._host.new_stream(ID.from_base58(server.peer_id), [LIBP2P_PROTOCOL])
                session = await hostile._handshake_as_dialer(server.peer_id, raw)
                await raw.write(payload)
                with trio.fail_after(10):
                    said = await framing.read_frame(session.reader.read_exactly)
                assert "decodes into more than" in said["x"], said
                with trio.fail_after(5):
                    while hostile.peer_id in server.connected_peers() or server.peer_id in hostile.connected_peers():
                        await trio.sleep(0.02)
            done.set()
        assert slowest < 1.0, slowest
