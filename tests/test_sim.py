"""The in-memory backend: latency, loss, faults and streams, all in trio's virtual time.

What both backends must do alike is in test_network_contract.py."""

import random
import time

import pytest
import trio

from p2p.errors import FrameTooLarge, PeerUnreachable, ProtocolNotSupported, RequestTimeout, StreamClosed
from p2p.framing import DEFAULT_MAX_FRAME
from p2p.sim import EPOCH, LatencyModel, Place, SimWorld

LONDON = Place(51.5, -0.13, "eu-west")
NEW_YORK = Place(40.7, -74.0, "us-east")
ECHO = "/potluck/echo/1.0.0"


async def echo(peer_id, body):
    return {"from": peer_id, "body": body}


def exact(**kw):
    """A world without jitter or time rounding, so delays can be checked to the microsecond."""
    return SimWorld.open(latency=LatencyModel(jitter=0.0), resolution=0.0, **kw)


def pair(world, a_place=LONDON, b_place=NEW_YORK):
    a, b = world.add_node(place=a_place), world.add_node(place=b_place)
    for node in (a, b):
        node.set_request_handler(ECHO, echo)
    a.add_address(b.peer_id, b.addr)
    return a, b


def test_rtt_model_is_geographic():
    model = LatencyModel()
    rtt = model.rtt(LONDON, NEW_YORK)
    # ≈5,570 km: 2 × 5,570 × 1.5 / 200,000 km/s ≈ 83.6 ms, + 2 × 5 ms of last mile.
    assert 0.090 < rtt < 0.097
    assert model.rtt(LONDON, LONDON) == pytest.approx(0.010)
    samples = [model.one_way(LONDON, NEW_YORK) for _ in range(1000)]
    assert min(samples) >= rtt / 2 * 0.9 and max(samples) <= rtt / 2 * 1.1
    assert max(samples) - min(samples) > rtt / 2 * 0.15


async def test_request_takes_one_rtt_and_connect_one_more(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        rtt = world.rtt(a.peer_id, b.peer_id)
        seen = []
        b.add_connection_listener(lambda peer, up: seen.append((peer, up)))
        start = trio.current_time()
        reply = await a.request(b.peer_id, ECHO, {"x": b"\x01"})
        assert reply == {"from": a.peer_id, "body": {"x": b"\x01"}}
        assert trio.current_time() - start == pytest.approx(2 * rtt)  # implicit dial, then the request
        assert seen == [(a.peer_id, True)]
        assert a.connected_peers() == [b.peer_id] and b.connected_peers() == [a.peer_id]
        assert b.address_of(a.peer_id) == a.addr  # learnt from the inbound connection
        start = trio.current_time()
        await a.request(b.peer_id, ECHO, None)
        assert trio.current_time() - start == pytest.approx(rtt)
        assert a.now() == pytest.approx(EPOCH + trio.current_time())


async def test_unknown_protocol_is_refused_in_one_rtt(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        await a.connect(b.addr)
        start = trio.current_time()
        with pytest.raises(ProtocolNotSupported):
            await a.request(b.peer_id, "/nope", {})
        assert trio.current_time() - start == pytest.approx(world.rtt(a.peer_id, b.peer_id))


async def test_addresses_and_peer_unreachable(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        c = world.add_node()
        with pytest.raises(PeerUnreachable):
            await a.request(c.peer_id, ECHO, {})  # no address known
        with pytest.raises(PeerUnreachable):
            await a.connect("/ip4/1.2.3.4/tcp/1")
        with pytest.raises(PeerUnreachable):
            await a.connect(f"/sim/{c.index}/p2p/{b.peer_id}")  # wrong peer at that address
        assert await a.connect(c.addr) == c.peer_id
        assert set(a.connected_peers()) == {c.peer_id}
        await a.disconnect(c.peer_id)
        assert a.connected_peers() == [] and c.connected_peers() == []


async def test_oversized_body_is_refused_before_sending(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        with pytest.raises(FrameTooLarge):
            await a.request(b.peer_id, ECHO, b"x" * (DEFAULT_MAX_FRAME + 1))
        assert world.total_messages == 0


async def test_total_loss_times_out_at_the_deadline(autojump_clock):
    async with exact(loss=1.0) as world:
        a, b = pair(world)
        start = trio.current_time()
        with pytest.raises(RequestTimeout):
            await a.connect(b.addr, timeout=3.0)
        assert trio.current_time() - start == pytest.approx(3.0)
        assert world.messages_dropped == 1


async def test_partial_loss_loses_some_requests(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        await a.connect(b.addr)
        world.loss = 0.2
        outcomes = []
        for _ in range(200):
            try:
                await a.request(b.peer_id, ECHO, 1, timeout=1.0)
                outcomes.append(True)
            except RequestTimeout:
                outcomes.append(False)
        # Either leg may be lost: P(success) = 0.8² = 0.64.
        assert 0.5 < sum(outcomes) / len(outcomes) < 0.78
        assert world.messages_sent[a.peer_id] == 201  # the dial, then 200 requests
        assert world.messages_dropped == 200 - sum(outcomes)


async def test_crash_and_restart(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        events = []
        a.add_connection_listener(lambda peer, up: events.append((peer, up)))
        handler_cancelled = trio.Event()

        async def slow(peer_id, body):
            try:
                await trio.sleep(60)
            finally:
                handler_cancelled.set()

        b.set_request_handler("/slow", slow)
        await a.connect(b.addr)
        async with trio.open_nursery() as nursery:

            async def in_flight():
                with pytest.raises(RequestTimeout):
                    await a.request(b.peer_id, "/slow", {}, timeout=5.0)

            nursery.start_soon(in_flight)
            await trio.sleep(0.2)  # the request is being handled
            world.crash(b.peer_id)
            await trio.sleep(0.001)
            assert handler_cancelled.is_set()
            assert events == [(b.peer_id, True), (b.peer_id, False)]
            assert a.connected_peers() == [] and b.connected_peers() == []
        with pytest.raises(RequestTimeout):
            await a.request(b.peer_id, ECHO, {}, timeout=2.0)  # a dead peer is silent, not refused
        with pytest.raises(RequestTimeout):
            await b.request(a.peer_id, ECHO, {}, timeout=2.0)  # and says nothing itself

        world.restart(b.peer_id)
        assert b.connected_peers() == []
        assert (await a.request(b.peer_id, ECHO, 7))["body"] == 7  # same address, same handlers
        assert events[-1] == (b.peer_id, True)


async def test_message_in_flight_to_a_crashing_peer_is_dropped(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        got = []

        async def record(peer_id, body):
            got.append(body)

        b.set_request_handler("/rec", record)
        await a.connect(b.addr)
        async with trio.open_nursery() as nursery:

            async def send():
                with pytest.raises(RequestTimeout):
                    await a.request(b.peer_id, "/rec", 1, timeout=1.0)

            nursery.start_soon(send)
            await trio.sleep(0.01)  # on the wire: one-way delay is ~47 ms
            world.crash(b.peer_id)
            world.restart(b.peer_id)
        assert got == []


async def test_partition_and_heal(autojump_clock):
    async with exact() as world:
        nodes = [world.add_node(place=LONDON) for _ in range(4)]
        for n in nodes:
            n.set_request_handler(ECHO, echo)
        a, b, c, d = nodes
        for x in nodes:
            for y in nodes:
                if x is not y:
                    x.add_address(y.peer_id, y.addr)
        await a.connect(b.addr)
        await a.connect(c.addr)
        world.partition([a.peer_id, b.peer_id], [c.peer_id])  # d is alone in its own group
        assert a.connected_peers() == [b.peer_id]
        assert (await a.request(b.peer_id, ECHO, 1))["body"] == 1
        for x, y in [(a, c), (c, a), (a, d), (c, d)]:
            with pytest.raises(RequestTimeout):
                await x.request(y.peer_id, ECHO, 1, timeout=1.0)
        world.heal()
        assert (await a.request(c.peer_id, ECHO, 2))["body"] == 2
        assert (await c.request(d.peer_id, ECHO, 3))["body"] == 3


async def test_streams_are_ordered_even_with_jitter_and_loss(autojump_clock):
    async with SimWorld.open(latency=LatencyModel(jitter=0.5), seed=3) as world:
        a, b = pair(world)
        received = []
        ended = trio.Event()

        async def sink(stream):
            try:
                while True:
                    received.append(await stream.receive())
            except StreamClosed:
                ended.set()

        b.set_stream_handler("/sink", sink)
        stream = await a.open_stream(b.peer_id, "/sink")
        world.loss = 0.3  # on a stream, loss is a retransmit: late, never missing or reordered
        start = trio.current_time()
        for i in range(100):
            await stream.send(i)
        await stream.aclose()
        with pytest.raises(StreamClosed):
            await stream.send(101)
        with pytest.raises(StreamClosed):
            await stream.receive()
        await ended.wait()
        assert received == list(range(100))
        rtt = world.rtt(a.peer_id, b.peer_id)
        assert rtt < trio.current_time() - start < 2 * rtt


async def test_streams_reset_on_crash_and_partition(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        inbound = []

        async def hold(stream):
            inbound.append(stream)
            await trio.sleep_forever()

        b.set_stream_handler("/hold", hold)
        s1 = await a.open_stream(b.peer_id, "/hold")
        await trio.sleep(1)
        world.partition([a.peer_id], [b.peer_id])
        with pytest.raises(StreamClosed):
            await s1.receive()
        with pytest.raises(StreamClosed):
            await inbound[0].send(1)
        world.heal()
        s2 = await a.open_stream(b.peer_id, "/hold")
        async with trio.open_nursery() as nursery:

            async def reader():
                with pytest.raises(StreamClosed):
                    await s2.receive()

            nursery.start_soon(reader)
            await trio.sleep(1)
            world.crash(b.peer_id)
        with pytest.raises(StreamClosed):
            await s2.send(1)


async def test_bandwidth_serialises_a_senders_uplink(autojump_clock):
    async with SimWorld.open(latency=LatencyModel(jitter=0.0), resolution=0.0, bandwidth_bps=8e6) as world:
        a, b = pair(world, LONDON, LONDON)
        await a.connect(b.addr)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(a.request, b.peer_id, ECHO, b"x" * 1_000_000)
        # Two 1 MB bodies leave one after the other at 1 MB/s; each echo comes back the same way.
        assert 3.0 < trio.current_time() - start < 3.2


async def test_stats_count_messages_and_bytes(autojump_clock):
    async with exact() as world:
        a, b = pair(world)
        await a.request(b.peer_id, ECHO, b"x" * 1000)
        assert world.messages_sent[a.peer_id] == 2  # dial + request
        assert world.messages_sent[b.peer_id] == 2  # dial answer + reply
        assert 1000 < world.bytes_sent[a.peer_id] < 1100
        assert world.total_messages == 4
        assert world.total_bytes == world.bytes_sent[a.peer_id] + world.bytes_sent[b.peer_id]


async def test_thousand_nodes_twenty_requests_each(autojump_clock):
    """Throughput guard: 20,000 requests (and their dials) between 1,000 peers; ≈2 s here."""
    wall = time.perf_counter()
    async with SimWorld.open(seed=7) as world:
        nodes = [world.add_node() for _ in range(1000)]
        for n in nodes:
            n.set_request_handler(ECHO, echo)
        rng = random.Random(7)
        done = 0

        async def client(node):
            nonlocal done
            for _ in range(20):
                other = rng.choice(nodes)
                while other is node:
                    other = rng.choice(nodes)
                node.add_address(other.peer_id, other.addr)
                assert (await node.request(other.peer_id, ECHO, b"q" * 100))["from"] == node.peer_id
                done += 1

        async with trio.open_nursery() as nursery:
            for n in nodes:
                nursery.start_soon(client, n)
        assert done == 20_000
    assert time.perf_counter() - wall < 30
