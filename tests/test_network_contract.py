"""The `p2p.network.Network` contract, run against both backends.

Every test here runs twice: on `libp2p` (Libp2pNetwork on 127.0.0.1, real time) and on `sim` (SimNodes
in one SimWorld, a London–New York pair, virtual time). What only one backend does (simulated latency,
loss and partitions; swarm keys, reconnects, in-flight limits, flow control) is tested in
test_sim.py and test_libp2p_net.py.
"""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from trio.testing import MockClock

from p2p import framing
from p2p.errors import BadRequest, PeerUnreachable, ProtocolNotSupported, RemoteError, RequestTimeout, StreamClosed
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.network import MAX_REMOTE_ERROR_LEN
from p2p.sim import LatencyModel, Place, SimWorld

ECHO = "/potluck/echo/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
LONDON = Place(51.5, -0.13, "eu-west")
NEW_YORK = Place(40.7, -74.0, "us-east")


async def echo(peer_id, body):
    return {"from": peer_id, "body": body}


@pytest.fixture(params=["libp2p", "sim"])
def backend(request):
    return request.param


@pytest.fixture
def clock(backend):
    """The clock the test runs under (a test takes it as an argument, so that pytest-trio uses it):
    virtual for the simulator, jumping ahead whenever every task waits; None (trio's real clock) for libp2p."""
    return MockClock(autojump_threshold=0) if backend == "sim" else None


@pytest.fixture
async def networks(backend):
    """(a, b): two networks of the backend that have not met; b listens at `b.listen_addrs()[0]`."""
    if backend == "sim":
        async with SimWorld.open(latency=LatencyModel(seed=1), seed=1) as world:
            yield world.add_node(place=LONDON), world.add_node(place=NEW_YORK)
    else:
        async with AsyncExitStack() as stack:
            yield tuple([await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK))
                         for _ in range(2)])


@pytest.fixture
async def pair(networks):
    """(a, b): two networks of the backend, a connected to b."""
    a, b = networks
    await a.connect(b.listen_addrs()[0])
    return a, b


# --- request/response ------------------------------------------------------------------------------


async def test_request_reply_listeners_and_address_book(networks, clock):
    a, b = networks
    addr = b.listen_addrs()[0]
    assert addr.endswith(f"/p2p/{b.peer_id}")
    events = []
    a.add_connection_listener(lambda p, up: events.append(("a", p, up)))
    b.add_connection_listener(lambda p, up: events.append(("b", p, up)))
    b.set_request_handler(ECHO, echo)
    assert await a.connect(addr) == b.peer_id
    assert await a.request(b.peer_id, ECHO, {"x": [1, b"2", "3"]}) == {"from": a.peer_id, "body": {"x": [1, b"2", "3"]}}
    # the one connection carries requests both ways
    a.set_request_handler(ECHO, echo)
    assert (await b.request(a.peer_id, ECHO, None))["from"] == b.peer_id
    assert a.connected_peers() == [b.peer_id] and b.connected_peers() == [a.peer_id]
    assert sorted(events) == [("a", b.peer_id, True), ("b", a.peer_id, True)]
    assert a.address_of(b.peer_id) == addr


async def test_implicit_dial_from_the_address_book(networks, clock):
    a, b = networks
    b.set_request_handler(ECHO, echo)
    with pytest.raises(PeerUnreachable):
        await a.request(b.peer_id, ECHO, 1)  # no address known
    a.add_address(b.peer_id, b.listen_addrs()[0])
    assert a.address_of(b.peer_id) == b.listen_addrs()[0]
    assert (await a.request(b.peer_id, ECHO, 1))["body"] == 1
    assert a.connected_peers() == [b.peer_id]


async def test_handlers_get_decoded_copies(pair, clock):
    a, b = pair
    got = []

    async def keep(peer_id, body):
        got.append(body)
        body["mutated"] = True
        return body

    b.set_request_handler("/keep", keep)
    sent = {"list": [1, 2]}
    reply = await a.request(b.peer_id, "/keep", sent)
    assert sent == {"list": [1, 2]} and got[0] is not sent
    assert reply == {"list": [1, 2], "mutated": True}


async def test_concurrent_requests_are_matched_by_id(pair, clock):
    a, b = pair

    async def slow_echo(peer_id, body):
        await trio.sleep((body * 7 % 10) / 200)
        return body * 2

    b.set_request_handler(ECHO, slow_echo)
    results = {}

    async def one(i):
        results[i] = await a.request(b.peer_id, ECHO, i)

    async with trio.open_nursery() as nursery:
        for i in range(100):
            nursery.start_soon(one, i)
    assert results == {i: 2 * i for i in range(100)}


async def test_handler_errors_and_unknown_protocols_reach_the_caller(pair, clock):
    a, b = pair

    async def refuse(peer_id, body):
        raise BadRequest("no thanks")

    async def crash(peer_id, body):
        raise ValueError("no such block: 42")

    b.set_request_handler("/potluck/refuse/1.0.0", refuse)
    b.set_request_handler("/potluck/crash/1.0.0", crash)
    with pytest.raises(RemoteError) as info:
        await a.request(b.peer_id, "/potluck/refuse/1.0.0", 1)
    assert (info.value.protocol, info.value.kind, info.value.message) == ("/potluck/refuse/1.0.0", "BadRequest", "no thanks")
    with pytest.raises(RemoteError) as info:
        await a.request(b.peer_id, "/potluck/crash/1.0.0", {})
    assert info.value.kind == "ValueError" and info.value.message == "no such block: 42"
    assert info.value.protocol == "/potluck/crash/1.0.0"
    with pytest.raises(ProtocolNotSupported):
        await a.request(b.peer_id, "/potluck/missing/1.0.0", 1)
    with pytest.raises(ProtocolNotSupported):
        await a.open_stream(b.peer_id, "/potluck/missing/1.0.0")
    # the connection survives all of that
    b.set_request_handler(ECHO, echo)
    assert (await a.request(b.peer_id, ECHO, 5))["body"] == 5


async def test_a_long_remote_error_is_cut_to_the_shared_limit(pair, clock):
    a, b = pair

    async def verbose(peer_id, body):
        raise ValueError("x" * (3 * MAX_REMOTE_ERROR_LEN))

    b.set_request_handler("/potluck/verbose/1.0.0", verbose)
    with pytest.raises(RemoteError) as info:
        await a.request(b.peer_id, "/potluck/verbose/1.0.0", 1)
    assert info.value.kind == "ValueError" and info.value.message == "x" * MAX_REMOTE_ERROR_LEN


async def test_request_timeout_while_the_peer_keeps_answering(pair, clock):
    a, b = pair

    async def never(peer_id, body):
        await trio.sleep_forever()

    b.set_request_handler("/potluck/never/1.0.0", never)
    b.set_request_handler(ECHO, echo)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def hang():
            with pytest.raises(RequestTimeout):
                await a.request(b.peer_id, "/potluck/never/1.0.0", 1, timeout=0.5)

        nursery.start_soon(hang)
        for i in range(20):
            assert (await a.request(b.peer_id, ECHO, i))["body"] == i
    assert 0.45 < trio.current_time() - t0 < 3
    assert (await a.request(b.peer_id, ECHO, "still"))["body"] == "still"


async def test_disconnect_notifies_both_sides_and_the_book_redials(pair, clock):
    a, b = pair
    events = []
    b.add_connection_listener(lambda p, up: events.append((p, up)))
    await a.disconnect(b.peer_id)
    with trio.fail_after(3):
        # a reachability dial-back (libp2p backend) may hold a short-lived probe connection of its own
        while (a.peer_id, False) not in events or a.connected_peers() or b.connected_peers():
            await trio.sleep(0.02)
    assert a.connected_peers() == [] and b.connected_peers() == []
    b.set_request_handler(ECHO, echo)
    assert (await a.request(b.peer_id, ECHO, 2))["body"] == 2  # re-dials from the address book


# --- streams ---------------------------------------------------------------------------------------


async def test_streams_deliver_in_order_both_ways(pair, clock):
    a, b = pair

    async def handler(stream):
        assert stream.peer_id == a.peer_id and stream.protocol == ECHO
        while True:
            try:
                msg = await stream.receive()
            except StreamClosed:
                return
            await stream.send({"n": msg["n"], "back": True})

    b.set_stream_handler(ECHO, handler)
    async with await a.open_stream(b.peer_id, ECHO) as s:
        async with trio.open_nursery() as nursery:
            async def sender():
                for i in range(500):
                    await s.send({"n": i})
            nursery.start_soon(sender)
            for i in range(500):
                assert await s.receive() == {"n": i, "back": True}


async def test_stream_handler_replies_and_unknown_stream_protocol(pair, clock):
    a, b = pair

    async def doubler(stream):
        while True:
            n = await stream.receive()
            await stream.send(n * 2)

    b.set_stream_handler("/double", doubler)
    async with await a.open_stream(b.peer_id, "/double") as stream:
        for i in range(5):
            await stream.send(i)
            assert await stream.receive() == 2 * i
    with pytest.raises(ProtocolNotSupported):
        await a.open_stream(b.peer_id, "/nope")


async def test_stream_close_is_seen_by_the_other_side(pair, clock):
    a, b = pair
    got = []
    done = trio.Event()

    async def handler(stream):
        try:
            while True:
                got.append(await stream.receive())
        except StreamClosed:
            done.set()

    b.set_stream_handler(ECHO, handler)
    s = await a.open_stream(b.peer_id, ECHO)
    for i in range(10):
        await s.send(i)
    await s.aclose()
    with trio.fail_after(3):
        await done.wait()
    assert got == list(range(10))  # nothing half-written is lost
    with pytest.raises(StreamClosed):
        await s.send(11)
    with pytest.raises(StreamClosed):
        await s.receive()


# --- size limits -----------------------------------------------------------------------------------


async def test_large_messages_and_the_frame_limit(pair, clock):
    a, b = pair
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB

    async def sized(peer_id, body):
        return {"len": len(body), "echo": body}

    async def stream_echo(stream):
        try:
            while True:
                await stream.send(await stream.receive())
        except StreamClosed:
            pass

    b.set_request_handler(ECHO, sized)
    b.set_stream_handler(ECHO, stream_echo)
    reply = await a.request(b.peer_id, ECHO, big, timeout=20)
    assert reply["len"] == len(big) and reply["echo"] == big
    async with await a.open_stream(b.peer_id, ECHO) as s:
        for _ in range(3):
            await s.send(big)
            assert await s.receive() == big
        # over the frame limit: refused before anything is sent
        with pytest.raises(framing.FrameTooLarge):
            await s.send(b"x" * (framing.DEFAULT_MAX_FRAME + 1))
    with pytest.raises(framing.FrameTooLarge):
        await a.request(b.peer_id, ECHO, b"x" * (framing.DEFAULT_MAX_FRAME + 1))
