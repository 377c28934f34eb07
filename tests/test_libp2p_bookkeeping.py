"""What a Libp2pNetwork keeps about other peers and about itself (p2p.libp2p): dial-back probes are no
connections, the address book and py-libp2p's peerstore are bounded, observed addresses count once per
reporting network, and address changes are pushed to connected peers (identify-push). Real sockets on
loopback."""

from __future__ import annotations

import socket
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from p2p.errors import P2PError
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork, identify, io
from p2p.libp2p.autonat import AutonatLimits

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
EAGER = AutonatLimits(per_peer_interval=0.0)  # every dial-back request is served


@asynccontextmanager
async def peers(n: int, listen: list[str] = LOOPBACK, **options):
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), listen, **options))
               for _ in range(n)]


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


def swarm_connections(net: Libp2pNetwork, peer_id: str) -> int:
    return len(net._swarm.get_connections(ID.from_base58(peer_id)))


# --- dial-back probes ---------------------------------------------------------------------------------


async def test_dial_backs_are_no_connections_and_a_check_never_redials():
    async with peers(2, autonat_limits=EAGER) as (a, b):
        await a.connect(b.listen_addrs()[0])
        most = {"a": 0, "b": 0}
        listed: set[tuple[str, ...]] = set()

        async def watch(done: trio.Event) -> None:
            while not done.is_set():
                most["a"] = max(most["a"], swarm_connections(a, b.peer_id))
                most["b"] = max(most["b"], swarm_connections(b, a.peer_id))
                listed.add((*a.connected_peers(), "|", *b.connected_peers()))
                await trio.sleep(0)

        done = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, done)
            for _ in range(3):  # each check: the other side dials us back on a new TCP + Noise socket
                assert (await a._autonat.check()).status == "public"
                assert (await b._autonat.check()).status == "public"
            done.set()
        assert a._autonat.stats["dialbacks_served"] >= 3 and b._autonat.stats["dialbacks_served"] >= 3
        assert most == {"a": 1, "b": 1}  # the probes never joined the swarm's connections
        assert listed == {(b.peer_id, "|", a.peer_id)}

        # a peer that left is not re-dialled by a check that had chosen it (a request would re-dial)
        ups: list[str] = []
        a.add_connection_listener(lambda peer, up: up and ups.append(peer))
        await a.disconnect(b.peer_id)
        await until(lambda: not a.connected_peers() and not b.connected_peers())
        assert await a._autonat.ask_one(b.peer_id, a._autonat.candidates()) is None
        assert ups == [] and a.connected_peers() == [] and swarm_connections(a, b.peer_id) == 0


# --- observed addresses ----------------------------------------------------------------------------


def lie_in_identify(net: Libp2pNetwork, observed: str) -> None:
    """`net` answers identify saying it sees the asker at `observed`, wherever the asker is."""

    async def answer(raw, peer_id: str) -> None:
        await io.write(raw, identify.encode(net, Multiaddr(observed)))
        await io.close(raw)

    net._identify._answer_identify = answer  # type: ignore[method-assign]


async def test_sybils_on_one_network_count_once_and_are_not_believed():
    fake = "/ip4/203.0.113.66/tcp/4001"
    async with peers(1) as (target,), \
            peers(1, ["/ip4/127.0.1.1/tcp/0"]) as (honest1,), peers(1, ["/ip4/127.0.2.1/tcp/0"]) as (honest2,), \
            AsyncExitStack() as stack:
        sybils = [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), [f"/ip4/127.0.9.{i}/tcp/0"]))
                  for i in range(1, 7)]
        for sybil in sybils:
            lie_in_identify(sybil, fake)
        # the target dials them all: it sees each at its own 127.0.N.x (its own connections come from 127.0.0.1)
        for other in (honest1, honest2, *sybils):
            await target.connect(other.listen_addrs()[0])
        await until(lambda: all(target.identified(o.peer_id) for o in (honest1, honest2, *sybils)))
        observed = dict(target.observed_addrs())
        assert observed[fake] == 1  # six reporters, one network (127.0.9.0/24)
        assert sum(observed.values()) == 3 and len(target._identify.observed) == 3
        assert target.confirmed_ips() == ["127.0.0.1"]  # two honest networks agree; the Sybils' IP is no candidate
        assert not any("203.0.113.66" in c for c in target._autonat.candidates())


# --- the address book and py-libp2p's peerstore --------------------------------------------------------


def closed_port() -> int:
    """A loopback TCP port nothing listens on (a dial there is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_announced_addresses_leave_the_book_and_the_peerstore_bounded():
    cap = 16
    async with peers(1, max_known_peers=cap) as (a,), peers(2) as (b, c):
        store = a._swarm.peerstore.peer_data_map
        await a.connect(b.listen_addrs()[0])
        await a.connect(c.listen_addrs()[0])
        await a.disconnect(c.peer_id)  # c was heard from: kept over peers never reached
        await until(lambda: a.connected_peers() == [b.peer_id])
        port = closed_port()
        fakes = [Identity.generate().peer_id for _ in range(3 * cap)]
        for i, fake in enumerate(fakes):
            addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/{fake}"
            with pytest.raises(P2PError):
                if i % 2:
                    await a.connect(addr, timeout=3.0)  # a failed dial drops what it added to the peerstore
                else:
                    a.add_address(fake, addr)  # noted for later (gossip, the DHT), then asked for
                    await a.request(fake, "/potluck/echo/1.0.0", 1, timeout=3.0)
            assert len(store) <= cap and len(a._book) <= cap
            assert ID.from_base58(fake) not in store
        assert len(a._book) <= cap
        assert a.address_of(b.peer_id) and a.address_of(c.peer_id)  # connected; heard from
        assert sum(a.address_of(f) is not None for f in fakes) < cap
        a.host.get_public_key()  # our own key pair is still in the peerstore
        a._identify.records.pop(b.peer_id, None)
        await a._identify.identify(b.peer_id)  # which identify needs


async def test_peers_dialled_with_success_are_pruned_from_the_peerstore_once_gone():
    cap = 4
    async with peers(1, max_known_peers=cap) as (a,), peers(6) as others:
        store = a._swarm.peerstore.peer_data_map
        for other in others:
            await a.connect(other.listen_addrs()[0])
        assert len(store) == 1 + len(others)  # connected peers are never pruned
        for other in others[:4]:
            await a.disconnect(other.peer_id)
        await until(lambda: sorted(a.connected_peers()) == sorted(o.peer_id for o in others[4:]))
        a.add_address(Identity.generate().peer_id, "/ip4/127.0.0.1/tcp/1")  # any change of the book prunes
        assert len(store) <= cap
        kept = {pid.to_base58() for pid in store}
        assert {a.peer_id, others[4].peer_id, others[5].peer_id} <= kept
        assert others[0].peer_id not in kept  # heard from longest ago


# --- identify-push on address changes ----------------------------------------------------------------


def circuits(record) -> list[str]:
    return [a for a in record.listen_addrs if "/p2p-circuit" in a]


async def relay_until(stop: trio.Event, identity: Identity, listen: list[str], *, task_status=trio.TASK_STATUS_IGNORED):
    """A relay service at `listen` until `stop` is set; starts with its address."""
    async with Libp2pNetwork.open(identity, listen, relay_service=True) as relay:
        task_status.started(relay.listen_addrs()[0])
        await stop.wait()


async def test_peers_learn_a_relay_reservation_lost_and_made_again_without_reconnecting():
    relay_identity = Identity.generate()
    async with peers(1) as (a,), trio.open_nursery() as nursery:
        gone = trio.Event()
        relay_addr = await nursery.start(relay_until, gone, relay_identity, LOOPBACK)
        async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[relay_addr]) as b:
            events: list[tuple[str, bool]] = []
            a.add_connection_listener(lambda peer, up: events.append((peer, up)))
            await a.connect(b.direct_addrs()[0])  # not through the relay (its circuit address is listed first)
            await until(lambda: a.identified(b.peer_id) is not None)
            assert circuits(a.identified(b.peer_id)) == [f"{relay_addr}/p2p-circuit"]
            connection = a._swarm.get_connections(ID.from_base58(b.peer_id))[0]

            gone.set()  # the relay goes away: b's reservation with it
            await until(lambda: not circuits(a.identified(b.peer_id)), 10)
            assert a.identified(b.peer_id).listen_addrs == tuple(x.rsplit("/p2p/", 1)[0] for x in b.listen_addrs())

            # the relay is back at the same address: b reserves again, and a hears of it
            back = trio.Event()
            await nursery.start(relay_until, back, relay_identity, [relay_addr.rsplit("/p2p/", 1)[0]])
            await until(lambda: b.relay_status()["reserved_on"], 20)
            await until(lambda: circuits(a.identified(b.peer_id)), 10)
            back.set()
            assert events == [(b.peer_id, True)]  # no reconnection: the same connection all along
            assert a._swarm.get_connections(ID.from_base58(b.peer_id)) == [connection]


class _FlappingNet:
    """What `IdentifyService` pushing needs: 100 connected peers, and addresses that change at every look."""

    def __init__(self):
        self.looks = 0
        self.peers = [Identity.generate().peer_id for _ in range(100)]

    def advertised_addrs(self) -> list[str]:
        self.looks += 1
        return [f"/ip4/192.0.2.1/tcp/{self.looks}"]

    def connected_peers(self) -> list[str]:
        return self.peers


async def test_pushes_are_bounded_in_rate_and_in_peers(autojump_clock):
    net = _FlappingNet()
    service = identify.IdentifyService(net, serve=False, push_interval=5.0, max_push_peers=8)  # type: ignore[arg-type]
    service.records = {p: None for p in net.peers[:50]}  # type: ignore[misc]  # 50 of them identified to us
    rounds: list[tuple[float, list[str]]] = []

    async def push(peer_id: str) -> None:
        if not rounds or rounds[-1][0] != trio.current_time():
            rounds.append((trio.current_time(), []))
        rounds[-1][1].append(peer_id)

    service.push = push  # type: ignore[method-assign]
    with trio.move_on_after(60):
        await service.push_on_change()
    assert 5 <= len(rounds) <= 60 / 5
    assert all(later - earlier >= 5.0 for (earlier, _), (later, _) in zip(rounds, rounds[1:]))
    assert all(len(set(peers)) == len(peers) == 8 and set(peers) <= set(service.records) for _, peers in rounds)
