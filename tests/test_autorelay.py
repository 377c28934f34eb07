"""Automatic relays on loopback: relay announcements (potluck/relays.py: signed, bounded, expiring), the
chooser's policy (potluck/autorelay.py), and relays added and dropped while a Libp2pNetwork runs
(p2p/libp2p/relay.py). The namespace lab test with real NATs is tests/test_netns_autorelay.py."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from dht.node import DHTConfig, DHTNode
from dht.records import InvalidRecord, RecordStore, SignedValue, StoreLimits
from p2p.errors import PeerUnreachable
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork, RelayRefused
from p2p.libp2p.relay import STOP_PROTOCOL, CircuitRelay
from p2p.sim import Place, SimWorld
from potluck.autorelay import AutoRelay, AutoRelayConfig
from potluck.peer import _validators
from potluck.relays import MAX_RELAY_RECORDS, RelayAd, RelayAnnouncing, RelayBook, dial_addrs, relay_addrs, relay_key

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
KEY = relay_key(None)


def _addr(peer_id: str, port: int = 4001) -> str:
    return f"/ip4/203.0.113.7/tcp/{port}/p2p/{peer_id}"


def _entry(identity: Identity, value, ttl: float = 600.0, suffix: str = "", key: str = KEY) -> SignedValue:
    return SignedValue.create(identity, key, value, time.time() + ttl, suffix)


# --- the DHT record ---------------------------------------------------------------------------------

def test_a_relay_announcement_is_checked_strictly():
    validators = _validators()
    me = Identity.generate()
    other = Identity.generate()
    good = {"addrs": [_addr(me.peer_id)], "region": "eu"}
    validators.check(_entry(me, good), time.time())
    bad_values = [
        {"addrs": [_addr(other.peer_id)], "region": "eu"},  # another peer's address
        {"addrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{other.peer_id}/p2p-circuit/p2p/{me.peer_id}"], "region": ""},  # a circuit
        {"addrs": [_addr(me.peer_id, p) for p in range(5)], "region": ""},  # too many
        {"addrs": [], "region": ""},
        {"addrs": [_addr(me.peer_id)], "region": "x" * 65},
        {"addrs": [_addr(me.peer_id)]},
        {"addrs": "nope", "region": ""},
        [1, 2],
    ]
    for value in bad_values:
        with pytest.raises(InvalidRecord):
            validators.check(_entry(me, value), time.time())
    with pytest.raises(InvalidRecord, match="no suffix"):
        validators.check(_entry(me, good, suffix="second"), time.time())
    forged = _entry(me, good)
    with pytest.raises(InvalidRecord, match="signature"):
        validators.check(SignedValue(forged.key, other.peer_id, forged.raw, forged.expires, forged.signature),
                         time.time())
    expired = SignedValue.create(me, KEY, good, time.time() - 1)
    with pytest.raises(InvalidRecord, match="expired"):
        validators.check(expired, time.time())


def test_a_node_holds_a_bounded_number_of_relay_announcements():
    store = RecordStore(_validators(), StoreLimits())
    now = time.time()
    owners = [Identity.generate() for _ in range(MAX_RELAY_RECORDS)]
    for i, owner in enumerate(owners):
        assert store.put(_entry(owner, {"addrs": [_addr(owner.peer_id)], "region": ""}), now, sender=f"s{i}")
    # A full record takes a newcomer only in place of the latest arrival: the relays heard first stay.
    for i, late in enumerate([Identity.generate() for _ in range(5)]):
        store.put(_entry(late, {"addrs": [_addr(late.peer_id)], "region": ""}), now, sender=f"late{i}")
        held = store.get(KEY, now)
        assert len(held) == MAX_RELAY_RECORDS and {o.peer_id for o in owners[:-2]} <= set(held)
    # A relay refreshing its own entry is not a newcomer.
    first = owners[0]
    store.put(_entry(first, {"addrs": [_addr(first.peer_id)], "region": "eu"}, ttl=900), now, sender="s0")
    assert store.get(KEY, now)[first.peer_id].value["region"] == "eu"
    # other namespaces keep the store's own (larger) cap
    other_key = "misc/x"
    for owner in owners:
        store.put(_entry(owner, 1, key=other_key), now)
    assert len(store.get(other_key, now)) == len(owners)


def test_swarms_announce_relays_under_their_own_key():
    assert relay_key(None) == "relays/open"
    assert relay_key(b"a" * 32) != relay_key(b"b" * 32)
    assert relay_key(b"a" * 32).startswith("relays/")


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_relay_announces_itself_in_the_dht_and_its_entry_expires_when_it_stops(autojump_clock):
    async with SimWorld.open(seed=3) as world:
        async with trio.open_nursery() as nursery:
            nodes = []
            for i in range(6):
                net = world.add_node(place=Place(50.0, 8.0 + i, "eu", last_mile_ms=1.0))
                dht = DHTNode(net, bootstrap=[nodes[0].network.listen_addrs()[0]] if nodes else [],
                              validators=_validators(), config=DHTConfig(request_timeout=2.0, cluster_thresholds={}))
                await nursery.start(dht.run)
                nodes.append(dht)
            relay, reader = nodes[1], nodes[5]
            announcing = RelayAnnouncing(relay, KEY, relay.network.listen_addrs, "eu", ttl=60.0, period=20.0)
            announcer = trio.CancelScope()
            nursery.start_soon(_run_in, announcer, announcing.run)
            await trio.sleep(10.0)
            book = RelayBook(reader.network.peer_id, reader.network.now)
            book.hear_entries(await reader.get(KEY))
            assert [(ad.peer_id, ad.addrs, ad.region) for ad in book.relays()] == [
                (relay.network.peer_id, tuple(relay.network.listen_addrs()), "eu")]
            await trio.sleep(100.0)  # re-stored every 20 s: still there after its first ttl
            assert relay.network.peer_id in await reader.get(KEY)
            announcer.cancel()
            await trio.sleep(61.0)
            assert await reader.get(KEY) == {}
            assert book.relays() == []
            nursery.cancel_scope.cancel()


async def _run_in(scope, fn):
    with scope:
        await fn()


def test_a_relay_announces_where_peers_dialled_it_back_and_only_once_they_did():
    pid = Identity.generate().peer_id
    listening = [f"/ip4/0.0.0.0/tcp/4001/p2p/{pid}", f"/ip4/192.168.1.5/tcp/4001/p2p/{pid}"]
    assert relay_addrs({"status": "unknown", "reachable_addrs": []}, listening, pid) == []
    assert relay_addrs({"status": "private", "reachable_addrs": []}, listening, pid) == []
    public = {"status": "public", "reachable_addrs": ["/ip4/203.0.113.7/tcp/4001"]}
    assert relay_addrs(public, listening, pid) == [_addr(pid), f"/ip4/192.168.1.5/tcp/4001/p2p/{pid}"]
    # A LAN dial-back (sorted first as text) comes after the routable one; this host's addresses go.
    lan_first = {"status": "public", "reachable_addrs": ["/ip4/10.1.2.3/tcp/4001", "/ip4/203.0.113.7/tcp/4001"]}
    listening = [f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}", f"/ip6/0:0::0/tcp/4001/p2p/{pid}",
                 f"/ip4/10.1.2.3/tcp/4001/p2p/{pid}"]
    assert relay_addrs(lan_first, listening, pid) == [_addr(pid), f"/ip4/10.1.2.3/tcp/4001/p2p/{pid}"]
    loopback = {"status": "public", "reachable_addrs": ["/ip4/127.0.0.1/tcp/4001"]}
    assert relay_addrs(loopback, [f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"], pid) == [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"]  # a swarm on one machine


# --- the relay book ---------------------------------------------------------------------------------

def test_relay_book_is_bounded_expires_and_ignores_ourselves():
    clock = [1000.0]
    me = Identity.generate().peer_id
    book = RelayBook(me, lambda: clock[0], max_candidates=3)
    ids = [Identity.generate().peer_id for _ in range(5)]
    book.hear(RelayAd(me, (_addr(me),), "", 2000.0))
    for i, pid in enumerate(ids):
        book.hear(RelayAd(pid, (_addr(pid),), "", 1100.0 + i))
    assert [ad.peer_id for ad in book.relays()] == ids[2:]  # the least recently heard dropped first
    book.hear(RelayAd(ids[2], (_addr(ids[2]),), "", 1050.0))  # an older copy does not shorten it
    assert {ad.peer_id: ad.expires for ad in book.relays()}[ids[2]] == 1102.0
    clock[0] = 1103.5
    assert [ad.peer_id for ad in book.relays()] == [ids[4]]


def test_presence_notes_cannot_push_relays_read_from_the_dht_or_in_use_out_of_the_book():
    clock = [1000.0]
    in_use: set[str] = set()
    book = RelayBook(Identity.generate().peer_id, lambda: clock[0], max_candidates=3, max_noted=2,
                     in_use=in_use.__contains__)
    honest = [Identity.generate().peer_id for _ in range(3)]
    for pid in honest:
        book.hear(RelayAd(pid, (_addr(pid),), "", 1100.0))
    sybils = [Identity.generate().peer_id for _ in range(32)]
    for pid in sybils:  # 32 authors gossip `relay: true`
        book.hear_note(RelayAd(pid, (_addr(pid),), "", 1500.0))
    assert [ad.peer_id for ad in book.relays()] == [*honest, *sybils[-2:]]
    book.hear_note(RelayAd(honest[0], ("/ip4/198.51.100.1/tcp/1",), "", 1200.0))  # a note extends an entry
    assert book.relays()[0] == RelayAd(honest[0], (_addr(honest[0]),), "", 1200.0)
    # A relay in use stays while newer DHT entries arrive; the others in use go least recent first.
    in_use.add(honest[0])
    newer = [Identity.generate().peer_id for _ in range(3)]
    for pid in newer:
        book.hear(RelayAd(pid, (_addr(pid),), "", 1100.0))
    assert [ad.peer_id for ad in book.relays()][:3] == [honest[0], *newer[1:]]


def test_relay_book_takes_only_valid_dht_entries():
    me = Identity.generate()
    relay, liar = Identity.generate(), Identity.generate()
    book = RelayBook(me.peer_id, time.time)
    entries = {
        relay.peer_id: _entry(relay, {"addrs": [_addr(relay.peer_id)], "region": "us"}),
        liar.peer_id: _entry(liar, {"addrs": [_addr(relay.peer_id)], "region": "us"}),
    }
    book.hear_entries(entries)
    assert [(ad.peer_id, ad.region) for ad in book.relays()] == [(relay.peer_id, "us")]


def test_a_relay_is_dialled_only_where_we_may_and_routable_addresses_first():
    pid = Identity.generate().peer_id
    names = ["/ip4/10.0.0.9/tcp/1", "/ip4/127.0.0.1/tcp/1", "/ip6/0:0::0/tcp/1", "/ip4/169.254.169.254/tcp/80",
             "/ip6/::1/tcp/1", "/ip4/203.0.113.7/tcp/4001", "/ip4/192.168.1.5/tcp/4001"]
    ad = RelayAd(pid, tuple(f"{a}/p2p/{pid}" for a in names), "", 1e12)
    assert dial_addrs(ad, ["198.51.100.3"]) == [_addr(pid)]  # a public peer: no loopback, link, LAN
    assert dial_addrs(ad, ["10.0.0.5"]) == [_addr(pid), f"/ip4/10.0.0.9/tcp/1/p2p/{pid}",
                                            f"/ip4/192.168.1.5/tcp/4001/p2p/{pid}"]  # behind a NAT
    assert dial_addrs(ad, ["127.0.0.1"]) == [_addr(pid), f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",
                                             f"/ip6/::1/tcp/1/p2p/{pid}"]  # a swarm on one machine
    only_loopback = RelayAd(pid, (f"/ip4/127.0.0.1/tcp/1/p2p/{pid}",), "", 1e12)
    assert dial_addrs(only_loopback, ["10.0.0.5", "198.51.100.3"]) == []


async def test_the_keeper_tries_each_address_of_a_relay_in_turn():
    async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, relay_service=True) as relay, \
            Libp2pNetwork.open(Identity.generate(), LOOPBACK) as nated:
        with trio.socket.socket() as closed:  # a port nothing listens on
            await closed.bind(("127.0.0.1", 0))
            dead = f"/ip4/127.0.0.1/tcp/{closed.getsockname()[1]}/p2p/{relay.peer_id}"
        relay_id = nated.add_relay(dead, also_at=[relay.listen_addrs()[0]])
        with trio.fail_after(20):
            while not nated.relays_held()[relay_id][0]:
                await trio.sleep(0.05)
        assert nated.listen_addrs()[0] == f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{nated.peer_id}"
        with pytest.raises(ValueError):
            nated.add_relay(relay.listen_addrs()[0], also_at=[_addr(nated.peer_id)])  # another peer's


# --- the chooser's policy ---------------------------------------------------------------------------

class Relays:
    """The network side of the chooser: which relays it was told to use, and what each one did."""

    def __init__(self):
        self.status = "unknown"
        self.held: dict[str, tuple[bool, PeerUnreachable | None]] = {}
        self.added: list[str] = []

    def reachability(self) -> dict:
        return {"status": self.status}

    def add_relay(self, addr: str, also_at=()) -> str:
        relay_id = addr.rsplit("/p2p/", 1)[1]
        self.held[relay_id] = (False, None)
        self.added.append(relay_id)
        return relay_id

    def drop_relay(self, relay_id: str) -> None:
        del self.held[relay_id]

    def relays_held(self):
        return dict(self.held)

    def direct_addrs(self) -> list[str]:
        return ["/ip4/10.0.0.5/tcp/4001"]  # behind a NAT

    def confirmed_ips(self) -> list[str]:
        return []


def _chooser(relays: Relays, rtts: dict[str, float], measured: dict[str, float | None] | None = None, **config):
    """A chooser given `rtts` (estimates, -1 for none), measured as estimated unless `measured` says."""
    measured = measured if measured is not None else {}
    me = Identity.generate().peer_id
    book = RelayBook(me, time.time)
    for pid in rtts:
        book.hear(RelayAd(pid, (_addr(pid),), "", time.time() + 600))
    reads = []

    async def read():
        reads.append(1)

    def rtt(pid):
        return rtts[pid] if rtts[pid] >= 0 else None

    return AutoRelay(relays, book, read, rtt, lambda pid: measured.get(pid, rtt(pid)),
                     AutoRelayConfig(check_interval=0.01, **config)), reads


def test_chooser_reserves_on_the_two_nearest_and_replaces_a_failed_one():
    ids = [Identity.generate().peer_id for _ in range(4)]
    relays = Relays()
    chooser, _ = _chooser(relays, {ids[0]: 0.2, ids[1]: -1, ids[2]: 0.01, ids[3]: 0.05})
    chooser.step()
    assert relays.added == [ids[2], ids[3]]  # nearest first; unknown RTTs last
    relays.held[ids[2]] = (True, None)
    relays.held[ids[3]] = (False, PeerUnreachable("relay died"))
    chooser.step()
    assert set(relays.held) == {ids[2], ids[0]} and ids[3] in chooser.avoided
    chooser.step()
    assert relays.added == [ids[2], ids[3], ids[0]]  # a live one stays, a pending one is given its grace


def test_chooser_replaces_a_relay_that_grants_nothing_within_its_grace():
    ids = [Identity.generate().peer_id for _ in range(2)]
    relays = Relays()
    chooser, _ = _chooser(relays, {ids[0]: 0.01, ids[1]: 0.02}, want=1, reserve_grace=0.0)
    chooser.step()
    assert relays.added == [ids[0]]
    chooser.step()
    assert relays.added == [ids[0], ids[1]] and list(relays.held) == [ids[1]]


def test_chooser_gives_a_relay_that_lost_its_reservation_time_to_reserve_again():
    ids = [Identity.generate().peer_id for _ in range(2)]
    relays = Relays()
    chooser, _ = _chooser(relays, {ids[0]: 0.01, ids[1]: 0.02}, want=1, reserve_grace=30.0)
    chooser.step()
    relays.held[ids[0]] = (True, None)
    chooser.step()
    chooser.chosen[ids[0]] -= 60.0  # reserved a minute ago ...
    relays.held[ids[0]] = (True, None)
    chooser.step()  # ... and seen reserved now: the grace counts from here
    relays.held[ids[0]] = (False, None)  # the connection dropped; the keeper is reserving again
    chooser.step()
    assert relays.added == [ids[0]] and chooser.stats["replaced"] == 0


def test_chooser_moves_to_a_much_nearer_relay_heard_of_later():
    far, farther, near, close = (Identity.generate().peer_id for _ in range(4))
    relays = Relays()
    rtts = {far: 0.08, farther: 0.15}
    chooser, _ = _chooser(relays, rtts)
    chooser.step()
    relays.held = {far: (True, None), farther: (True, None)}
    rtts[close] = 0.1  # nearer than the farthest, not by half: no move
    chooser.book.hear(RelayAd(close, (_addr(close),), "", time.time() + 600))
    chooser.step()
    assert set(relays.held) == {far, farther}
    rtts[near] = 0.005
    chooser.book.hear(RelayAd(near, (_addr(near),), "", time.time() + 600))
    chooser.step()  # reserves on the near one first ...
    assert set(relays.held) == {far, farther, near} and chooser.moving_to == near
    chooser.step()
    assert set(relays.held) == {far, farther, near}
    relays.held[near] = (True, None)
    chooser.step()  # ... and drops the farthest once it holds
    assert set(relays.held) == {far, near} and chooser.stats["moved_nearer"] == 1
    chooser.step()
    assert set(relays.held) == {far, near}  # the dropped one is farther than both: it stays dropped


async def test_chooser_acts_only_while_private():
    ids = [Identity.generate().peer_id for _ in range(3)]
    relays = Relays()
    chooser, reads = _chooser(relays, {pid: 0.01 for pid in ids})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chooser.run)
        await trio.sleep(0.1)
        assert relays.added == [] and reads == []  # unknown: nothing chosen
        relays.status = "private"
        with trio.fail_after(2):
            while len(relays.held) < 2:
                await trio.sleep(0.01)
        assert reads  # the DHT was read for announcements
        relays.status = "public"
        with trio.fail_after(2):
            while relays.held:
                await trio.sleep(0.01)
        assert chooser.chosen == {}
        nursery.cancel_scope.cancel()


# --- relays added and dropped while the network runs ------------------------------------------------

ECHO = "/potluck/echo/1.0.0"


async def echo(peer_id, body):
    return body


class _HeldHost:
    """The libp2p host of `_HeldDialer`: it registers handlers; a stream it opens never comes."""

    def __init__(self):
        self.handlers = {}

    def set_stream_handler(self, protocol, handler):
        self.handlers[protocol] = handler

    async def new_stream(self, peer_id, protocols):
        await trio.sleep_forever()


class _HeldDialer:
    """A RelayHost whose connect completes only when the test says so."""

    closing = False

    def __init__(self):
        self.peer_id = Identity.generate().peer_id
        self.host = _HeldHost()
        self.dialing = trio.Event()
        self.connected = trio.Event()

    def admitted(self, peer_id):
        return True

    async def connect(self, addr, timeout=5.0):
        self.dialing.set()
        await self.connected.wait()
        return addr.rsplit("/p2p/", 1)[1]

    def direct_addrs(self):
        return []

    def add_connection_listener(self, listener):
        pass


async def test_a_relay_dropped_in_the_tick_its_connect_completes_ends_its_keeper_quietly():
    net = _HeldDialer()
    circuits = CircuitRelay(net)
    async with trio.open_nursery() as nursery:
        await circuits.start(nursery)
        relay_id = circuits.add_relay(_addr(Identity.generate().peer_id))
        await net.dialing.wait()
        net.connected.set()  # the keeper is rescheduled with its connect done...
        circuits.drop_relay(relay_id)  # ...and the relay dropped before it runs again
        await trio.testing.wait_all_tasks_blocked()
        assert circuits.relays_held() == {} and circuits.circuit_addrs() == []
        nursery.cancel_scope.cancel()


@pytest.mark.slow
async def test_a_relay_added_while_running_reserves_and_a_dropped_one_withdraws():
    async with Libp2pNetwork.open(Identity.generate(), LOOPBACK, relay_service=True) as relay, \
            Libp2pNetwork.open(Identity.generate(), LOOPBACK) as nated, \
            Libp2pNetwork.open(Identity.generate(), LOOPBACK) as dialer:
        nated.set_request_handler(ECHO, echo)
        changes = []
        nated.add_address_listener(lambda: changes.append(list(nated.listen_addrs())))
        assert nated.listen_addrs() == nated.direct_addrs()
        assert STOP_PROTOCOL not in nated.host.get_mux().handlers  # no relay, no circuits accepted
        relay_id = nated.add_relay(relay.listen_addrs()[0])
        assert STOP_PROTOCOL in nated.host.get_mux().handlers
        assert relay_id == relay.peer_id
        with trio.fail_after(10):
            while not changes:
                await trio.sleep(0.05)
        circuit = nated.listen_addrs()[0]
        assert circuit == f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{nated.peer_id}"
        assert nated.relays_held() == {relay.peer_id: (True, None)}
        assert await dialer.connect(circuit) == nated.peer_id
        assert await dialer.request(nated.peer_id, ECHO, 7) == 7
        nated.drop_relay(relay_id)
        assert nated.listen_addrs() == nated.direct_addrs() and nated.relays_held() == {}
        assert len(changes) == 2
        await dialer.disconnect(nated.peer_id)
        with pytest.raises(PeerUnreachable):
            await dialer.connect(circuit)


@pytest.mark.slow
async def test_a_chosen_relay_that_is_not_one_reports_its_refusal():
    async with Libp2pNetwork.open(Identity.generate(), LOOPBACK) as plain, \
            Libp2pNetwork.open(Identity.generate(), LOOPBACK) as nated:
        relay_id = nated.add_relay(plain.listen_addrs()[0])
        with trio.fail_after(15):
            while nated.relays_held()[relay_id][1] is None:
                await trio.sleep(0.05)
        live, error = nated.relays_held()[relay_id]
        assert not live and isinstance(error, RelayRefused)
        with pytest.raises(ValueError):
            nated.add_relay(nated.listen_addrs()[0])  # ourselves


async def _run_relay(listen, stop, task_status=trio.TASK_STATUS_IGNORED):
    async with Libp2pNetwork.open(Identity.generate(), listen, relay_service=True) as relay:
        task_status.started(relay.listen_addrs()[0])
        await stop.wait()


@pytest.mark.slow
async def test_circuits_through_a_relay_that_dies_are_closed_at_both_ends():
    async with trio.open_nursery() as nursery:
        stop = trio.Event()
        relay_addr = await nursery.start(_run_relay, LOOPBACK, stop)
        async with Libp2pNetwork.open(Identity.generate(), LOOPBACK) as nated, \
                Libp2pNetwork.open(Identity.generate(), LOOPBACK) as dialer:
            nated.set_request_handler(ECHO, echo)
            nated.add_relay(relay_addr)
            with trio.fail_after(10):
                while not nated.relays_held()[relay_addr.rsplit("/p2p/", 1)[1]][0]:
                    await trio.sleep(0.05)
            assert await dialer.connect(nated.listen_addrs()[0]) == nated.peer_id
            assert await dialer.request(nated.peer_id, ECHO, 1) == 1
            stop.set()
            with trio.fail_after(5):
                while nated.peer_id in dialer.connected_peers() or dialer.peer_id in nated.connected_peers():
                    await trio.sleep(0.05)


def test_chooser_does_not_move_to_a_relay_near_only_by_its_coordinates():
    far, farther, faker, near = (Identity.generate().peer_id for _ in range(4))
    relays = Relays()
    rtts = {far: 0.08, farther: 0.15}
    measured: dict[str, float | None] = {}
    chooser, _ = _chooser(relays, rtts, measured)
    chooser.step()
    relays.held = {far: (True, None), farther: (True, None)}
    rtts[faker], measured[faker] = 0.0001, None  # its Vivaldi coordinates put it next door; never measured
    chooser.book.hear(RelayAd(faker, (_addr(faker),), "", time.time() + 600))
    chooser.step()
    assert set(relays.held) == {far, farther} and chooser.moving_to is None
    rtts[near] = 0.01  # measured as near: the move is made
    chooser.book.hear(RelayAd(near, (_addr(near),), "", time.time() + 600))
    chooser.step()
    assert chooser.moving_to == near
