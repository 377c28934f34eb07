"""Fake server announcements (issue #13): Sybil keys storing well-formed, signed announcements of huge
throughput at dead addresses must not fail honest generations, nor push an honest server's
announcement out of the record."""

import socket
import time

import pytest
import trio

from dht import protocol as kad
from dht.records import DEFAULT_MAX_TTL, RecordStore, SignedValue, Validators
from dht.vivaldi import Coord
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from pipeline.announce import AnnouncementValidator, ServerInfo, announce_key
from pipeline.protocol import ANNOUNCE_NAMESPACE
from pipeline.routing import RoutingConfig, find_route
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
NOW = 1_700_000_000.0


def closed_port() -> int:
    """A loopback TCP port where nothing listens (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fake_announcement(identity: Identity, blocks: int, port: int, now: float) -> dict:
    """A well-formed announcement of every block, a million tokens/s, at an address where nothing listens."""
    return ServerInfo(identity.peer_id, 0, blocks, 1e6, 1e7, 1 << 20, t=now,
                      addrs=(f"/ip4/127.0.0.1/tcp/{port}/p2p/{identity.peer_id}",), num_blocks=blocks).to_value()


def test_sybils_with_the_longest_ttl_do_not_evict_an_honest_announcement():
    validators = Validators()
    validators.register(ANNOUNCE_NAMESPACE, AnnouncementValidator())
    store = RecordStore(validators)
    key = announce_key("m" * 64)
    honest = Identity.generate()

    def announce(t: float) -> SignedValue:  # what a server stores every 30 s, for 60 s
        info = ServerInfo(honest.peer_id, 0, 4, 100.0, 1000.0, 4096, t=t, addrs=(f"/ip4/127.0.0.1/tcp/4001/p2p/{honest.peer_id}",))
        return SignedValue.create(honest, key, info.to_value(), t + 60)

    assert store.put(announce(NOW), NOW)
    port = closed_port()
    limit = store.limits.max_subkeys
    for i in range(limit + 100):  # more Sybils than the record holds, each with the longest TTL allowed
        sybil = Identity.generate()
        now = NOW + i * 0.01
        store.put(SignedValue.create(sybil, key, fake_announcement(sybil, 4, port, now), now + DEFAULT_MAX_TTL - 1),
                  now, sender="flooder")
        if i == limit // 2:
            assert store.put(announce(NOW + 30), now)  # re-announced while the record fills
    held = store.get(key, NOW + 40)
    assert len(held) == limit
    assert honest.peer_id in held
    # a DHT reply carries the first MAX_ENTRIES entries: those held longest, the honest one among them
    assert honest.peer_id in list(held)[:kad.MAX_ENTRIES]


def test_routing_prefers_a_server_it_reached_over_announced_throughput():
    honest = ServerInfo("honest", 0, 4, 100.0, 1000.0, 4096)
    fakes = [ServerInfo(f"sybil{i}", 0, 4, 1e6, 1e7, 1 << 20) for i in range(50)]
    believing = find_route([honest, *fakes], 0, 4)
    assert believing[0].peer_id.startswith("sybil")  # announcements alone: the biggest claim wins
    route = find_route([honest, *fakes], 0, 4, verified=lambda p: p == "honest")
    assert [h.peer_id for h in route] == ["honest"]
    # never-reached servers are still routed to when nothing reached covers the blocks
    tail = [ServerInfo(f"sybil{i}", 2, 4, 1e6, 1e7, 1 << 20) for i in range(50)]
    route = find_route([ServerInfo("honest", 0, 2, 100.0, 1000.0, 4096), *tail], 0, 4, verified=lambda p: p == "honest")
    assert route[0].peer_id == "honest" and route[-1].peer_id.startswith("sybil")


async def _store_fakes(holders: list[str], model_id: str, blocks: int, count: int) -> int:
    """`count` fresh keys, each storing a fake announcement at every holder through one stranger; how many held."""
    key = announce_key(model_id)
    port = closed_port()
    stored = 0
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as net:
        entries = []
        for _ in range(count):
            sybil, now = Identity.generate(), net.now()
            entries.append(SignedValue.create(sybil, key, fake_announcement(sybil, blocks, port, now), now + 3600))
        for addr in holders:
            holder = await net.connect(addr, timeout=10)
            for i in range(0, len(entries), kad.MAX_ENTRIES):
                reply = await net.request(holder, kad.PROTOCOL, {
                    "op": "store", "i": kad.encode_info(Coord(), [], None), "k": key,
                    "e": [e.wire() for e in entries[i:i + kad.MAX_ENTRIES]]}, timeout=10)
                stored += sum(1 for ok in reply["ok"] if ok is True)
    return stored


@pytest.mark.parametrize("fakes", [300])
async def test_honest_generations_succeed_among_hundreds_of_fake_announcements(llama, fakes):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 8)
    figures = {}
    with trio.fail_after(150):
        async with swarm("libp2p", path, [(0, 2), (2, 4)], model_id=mid) as s:
            before = await s.client()
            t0 = time.monotonic()
            assert (await before.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])).token_ids == want
            figures["before_s"] = round(time.monotonic() - t0, 2)

            holders = [p.network.peer_id for p in s.servers]
            stored = await _store_fakes([p.network.listen_addrs()[0] for p in s.servers], mid, 4, fakes)
            assert stored >= fakes * len(holders) * 0.9

            # a new client, already connected to the swarm, then one that has read the announcements
            # but holds no connection to any server: it must find the live ones among the fakes
            connected = await s.client()
            cold = await s.client()
            await cold.sequence.refresh(force=True)
            network = s.clients[-1].network
            for peer in network.connected_peers():
                await network.disconnect(peer)
            for name, model in [("connected", connected), ("cold", cold)]:
                t0 = time.monotonic()
                for _ in range(3):
                    g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
                    assert g.token_ids == want
                    assert all(not p.startswith("sybil") and p in holders for p, _, _ in g.route)
                figures[f"{name}_s_per_generation"] = round((time.monotonic() - t0) / 3, 2)
                figures[f"{name}_dials_failed"] = model.sequence.dials_failed
                assert sum(i.decode_tps == 1e6 for i in model.sequence.servers) >= 200  # it read the fakes
            # one that neither probes nor gets a head start from RTTs (every fake looks cheaper than the
            # live servers): it opens fakes one after another, each a dial spent but no retry of its 0
            blind = await s.client(probe_width=0, max_recoveries=0)
            blind.sequence.config = RoutingConfig(default_rtt=0.0)
            await blind.sequence.refresh(force=True)
            network = s.clients[-1].network
            for peer in network.connected_peers():
                await network.disconnect(peer)
            g = await blind.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == want
            assert blind.sequence.dials_failed > 0 and not blind.sequence.banned()
            figures["blind_dials_failed"] = blind.sequence.dials_failed
            print(figures)


async def test_a_server_left_out_after_a_failed_first_dial_is_opened_once_more_rather_than_no_route(llama):
    """A first dial has a short timeout; failing it (a loaded or just restarted server) leaves the server out
    for a while. When that leaves some block without a route, the client opens it once more with the full
    open timeout instead of answering "no route"."""
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 4)
    with trio.fail_after(120):
        async with swarm("libp2p", path, [(0, 2), (2, 4)], model_id=mid) as s:
            client = await s.client()
            await client.sequence.refresh(force=True)
            tail = next(p.network.peer_id for p in s.servers if p.server.start == 2)
            client.sequence.note_contact(tail, False)  # as if its first dial had timed out
            assert tail in client.sequence.unreachable
            assert (await client.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])).token_ids == want
            assert tail in client.sequence.reached
