"""Circuit relay v2 between Libp2pNetworks on 127.0.0.1 (p2p.libp2p.relay): a relay service, a 'NATed' peer
that only dials out and is reached through its circuit address, and outsiders that try to use the relay.

The NATed peer does listen on loopback (every Libp2pNetwork does), but nobody is given that address:
its peers know only the circuit address, and the relay's counters show the traffic went through it."""

from __future__ import annotations

import statistics
import time
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p import new_host
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr import Multiaddr

from p2p.errors import PeerUnreachable, SwarmKeyMismatch
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork, RelayLimits, RelayRefused
from p2p.libp2p.relay import HOP_PROTOCOL

pytestmark = pytest.mark.slow  # relays, reservations, circuits on real sockets

ECHO = "/potluck/echo/1.0.0"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
KEY = b"k" * 32
OTHER = b"o" * 32


async def echo(peer_id, body):
    return {"from": peer_id, "body": body}


@asynccontextmanager
async def trio_of_peers(key=None, limits=None):
    """(relay, nated, dialer): a relay service, a peer that reserved on it, and a plain peer."""
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relay_service=True, relay_limits=limits))
        nated = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relays=[relay.listen_addrs()[0]],
                               hole_punch=False))  # these tests are about the circuit (test_libp2p_holepunch)
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key))
        for net in (relay, nated, dialer):
            net.set_request_handler(ECHO, echo)
        yield relay, nated, dialer


async def rtts(net, peer, n=20):
    out = []
    for i in range(n):
        t = time.perf_counter()
        assert (await net.request(peer, ECHO, i))["body"] == i
        out.append((time.perf_counter() - t) * 1000)
    return statistics.median(out)


async def test_nated_peer_is_reached_through_its_circuit_address():
    async with trio_of_peers() as (relay, nated, dialer):
        circuit = nated.listen_addrs()[0]
        relay_addr = relay.listen_addrs()[0]
        assert circuit == f"{relay_addr}/p2p-circuit/p2p/{nated.peer_id}"
        assert nated.listen_addrs()[1:] == nated.direct_addrs()
        assert relay.listen_addrs() == relay.direct_addrs()  # a relay service announces no circuit
        assert relay.relay_status()["reservations_served"] == 1

        assert await dialer.connect(circuit) == nated.peer_id
        assert dialer.address_of(nated.peer_id) == circuit
        assert (await dialer.request(nated.peer_id, ECHO, "hi"))["from"] == dialer.peer_id
        # the one session carries requests both ways: the NATed peer calls back over the circuit
        assert (await nated.request(dialer.peer_id, ECHO, "back"))["from"] == nated.peer_id
        assert sorted(nated.connected_peers()) == sorted([relay.peer_id, dialer.peer_id])
        # long-lived streams work over the circuit too
        got = []

        async def collect(stream):
            while True:
                try:
                    got.append(await stream.receive())
                except Exception:
                    return

        nated.set_stream_handler(ECHO, collect)
        async with await dialer.open_stream(nated.peer_id, ECHO) as stream:
            for i in range(50):
                await stream.send(b"x" * 10_000 + bytes([i]))
        with trio.fail_after(5):
            while len(got) < 50:
                await trio.sleep(0.02)
        assert [m[-1] for m in got] == list(range(50))
        status = relay.relay_status()
        assert status["circuits_opened"] == 1 and status["circuits_active"] == 1
        assert status["bytes_relayed"] > 500_000

        # RTT through the relay vs direct (dialer -> relay is a direct session)
        relayed_ms = await rtts(dialer, nated.peer_id)
        direct_ms = await rtts(dialer, relay.peer_id)
        print(f"median request RTT on loopback: direct {direct_ms:.2f} ms, via relay {relayed_ms:.2f} ms")
        assert relayed_ms < direct_ms * 6 + 20

        # closing the circuit closes it on the relay and at the NATed peer
        await dialer.disconnect(nated.peer_id)
        with trio.fail_after(5):
            while relay.relay_status()["circuits_active"] or dialer.peer_id in nated.connected_peers():
                await trio.sleep(0.05)
        # and the address book redials through the relay
        assert (await dialer.request(nated.peer_id, ECHO, 2))["body"] == 2
        assert relay.relay_status()["circuits_opened"] == 2


async def test_private_swarm_over_a_relay():
    async with trio_of_peers(key=KEY) as (relay, nated, dialer):
        circuit = nated.listen_addrs()[0]
        assert "/p2p-circuit/" in circuit
        assert await dialer.connect(circuit) == nated.peer_id
        assert (await dialer.request(nated.peer_id, ECHO, 1))["body"] == 1
        relay_addr = relay.listen_addrs()[0]
        # An outsider (no key or another key) can neither reserve on the relay ...
        for key, message in [(None, "has no swarm key"), (OTHER, "keys differ")]:
            t0 = time.perf_counter()
            with pytest.raises(SwarmKeyMismatch, match=message):
                async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relays=[relay_addr]):
                    pass
            assert time.perf_counter() - t0 < 3
            # ... nor reach a member through it
            async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key) as outsider:
                with pytest.raises(SwarmKeyMismatch):
                    await outsider.connect(circuit)
        assert relay.relay_status()["reservations_served"] == 1
        assert relay.relay_status()["circuits_opened"] == 1


async def test_bare_libp2p_outsider_cannot_reserve_or_connect():
    """A plain py-libp2p host skips our gate and speaks circuit relay v2 to the relay directly."""
    async with trio_of_peers(key=KEY) as (relay, nated, dialer):
        outsider = new_host(listen_addrs=[Multiaddr(LOOPBACK[0])])
        async with outsider.run(listen_addrs=[Multiaddr(LOOPBACK[0])]):
            relay_pid = ID.from_base58(relay.peer_id)
            for msg in [HopMessage(type=HopMessage.RESERVE),
                        HopMessage(type=HopMessage.CONNECT, peer=PeerId(id=ID.from_base58(nated.peer_id).to_bytes()))]:
                await outsider.connect(info_from_p2p_addr(Multiaddr(relay.listen_addrs()[0])))
                stream = await outsider.new_stream(relay_pid, [HOP_PROTOCOL])
                await write_delimited_msg(stream, msg)
                with trio.fail_after(4), pytest.raises(Exception):
                    await read_delimited_msg(stream, HopMessage)  # reset, never a STATUS
        status = relay.relay_status()
        assert status["reservations_served"] == 1 and status["circuits_opened"] == 0
        assert status["circuits_refused"] >= 1  # (the second may find the connection already dropped by the gate)
        assert sorted(relay.connected_peers()) == [nated.peer_id]


async def test_refusals_are_clear():
    async with trio_of_peers() as (relay, nated, dialer):
        # a peer without a reservation: the relay says so
        stranger = Identity.generate().peer_id
        with pytest.raises(RelayRefused, match="holds no reservation") as info:
            await dialer.connect(f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{stranger}")
        assert isinstance(info.value, PeerUnreachable)
        # a relay address that is no relay service: open refuses to start
        with pytest.raises(RelayRefused, match="is not a relay"):
            async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[dialer.listen_addrs()[0]]):
                pass
        # malformed or self-referential configuration
        with pytest.raises(ValueError, match="circuit address"):
            Libp2pNetwork(Identity.generate(), relays=[nated.listen_addrs()[0]])
        with pytest.raises(PeerUnreachable, match="through this peer as its relay"):
            await relay.connect(f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{stranger}")


async def test_reservation_is_refreshed_before_it_expires():
    limits = RelayLimits(reservation_ttl=2)
    async with trio_of_peers(limits=limits) as (relay, nated, dialer):
        circuit = nated.listen_addrs()[0]
        await trio.sleep(3.0)  # past the 2 s ttl: refreshed at half-life
        assert nated.listen_addrs()[0] == circuit
        assert await dialer.connect(circuit) == nated.peer_id
        assert (await dialer.request(nated.peer_id, ECHO, 1))["body"] == 1


async def _run_relay(identity, listen, stop, task_status=trio.TASK_STATUS_IGNORED):
    async with Libp2pNetwork.open(identity, listen, relay_service=True) as relay:
        task_status.started(relay.listen_addrs()[0])
        await stop.wait()


async def test_relay_restart_withdraws_and_restores_the_circuit_address():
    relay_identity = Identity.generate()
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        relay_addr = await nursery.start(_run_relay, relay_identity, LOOPBACK, stop)
        port = relay_addr.split("/tcp/")[1].split("/")[0]
        async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[relay_addr], hole_punch=False) as nated, \
                Libp2pNetwork.open(Identity.generate(), LOOPBACK) as dialer:
            nated.set_request_handler(ECHO, echo)
            circuit = nated.listen_addrs()[0]
            assert "/p2p-circuit/" in circuit
            stop.set()  # the relay goes away: the circuit address is withdrawn
            with trio.fail_after(5):
                while nated.listen_addrs()[0] == circuit:
                    await trio.sleep(0.05)
            assert nated.listen_addrs() == nated.direct_addrs()
            with pytest.raises(PeerUnreachable):
                await dialer.connect(circuit)
            # the relay comes back (same identity and port): the reservation is made again
            stop = trio.Event()
            await nursery.start(_run_relay, relay_identity, [f"/ip4/127.0.0.1/tcp/{port}"], stop)
            t0 = time.perf_counter()
            with trio.fail_after(20):
                while nated.listen_addrs()[0] != circuit:
                    await trio.sleep(0.1)
            print(f"reservation re-made {time.perf_counter() - t0:.1f} s after the relay came back")
            assert await dialer.connect(circuit) == nated.peer_id
            assert (await dialer.request(nated.peer_id, ECHO, 3))["body"] == 3
            stop.set()
