"""Server announcements by gossip reach a client's routes at once, without a DHT read."""

import pytest
import trio

from dht.node import DHTNode
from dht.records import InvalidRecord
from p2p.gossip import Gossip
from p2p.sim import SimWorld
from pipeline.announce import GOSSIP_TOPIC, ServerInfo, from_gossip_note, gossip_note
from pipeline.routing import SequenceManager

MODEL = "m" * 64


async def test_gossiped_announcements_update_routes_at_once(autojump_clock):
    async with SimWorld.open(seed=3) as world, trio.open_nursery() as nursery:
        server, client = world.add_node(), world.add_node()
        gossips = [Gossip(n, n.identity) for n in (server, client)]
        for g in gossips:
            await nursery.start(g.run)
        await client.connect(server.listen_addrs()[0])
        sequence = SequenceManager(DHTNode(client), MODEL, 4, refresh_interval=1e9)
        sequence._fetched_at = trio.current_time()  # as if the DHT was just read (and was empty)
        gossips[1].subscribe(GOSSIP_TOPIC, lambda m: sequence.hear(from_gossip_note(m.author, m.data, client.now())[1]),
                             validator=lambda m: bool(from_gossip_note(m.author, m.data, client.now())))

        info = ServerInfo(server.peer_id, 0, 4, decode_tps=100.0, prefill_tps=1000.0, cache_tokens=512,
                          t=server.now())
        await gossips[0].publish(GOSSIP_TOPIC, gossip_note(MODEL, info, ttl=60))
        await trio.sleep(1)
        assert [s.peer_id for s in await sequence.refresh()] == [server.peer_id]
        assert [h.peer_id for h in await sequence.route(0, 4)] == [server.peer_id]

        offline = ServerInfo(server.peer_id, 0, 4, 100.0, 1000.0, 0, state="offline", t=server.now())
        await gossips[0].publish(GOSSIP_TOPIC, gossip_note(MODEL, offline, ttl=60))
        await trio.sleep(1)
        assert await sequence.refresh() == []

        # Past its ttl, a note is forgotten.
        again = ServerInfo(server.peer_id, 0, 4, 100.0, 1000.0, 512, t=server.now())
        await gossips[0].publish(GOSSIP_TOPIC, gossip_note(MODEL, again, ttl=5))
        await trio.sleep(1)
        assert len(await sequence.refresh()) == 1
        await trio.sleep(10)
        assert await sequence.refresh() == []
        assert gossips[1].stats.rejected == 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("data", [None, {"model": MODEL}, {"model": MODEL, "ttl": 1e9, "info": {}},
                                  {"model": MODEL, "ttl": 60, "info": {"v": 1, "start": 5, "end": 2}}])
def test_malformed_server_notes_are_refused(data):
    with pytest.raises(InvalidRecord):
        from_gossip_note("12D3KooWx", data, 0.0)
