"""1,000 peers on the simulator: lookups survive 10 % of peers killed, and walks return the true k closest."""

import random
import time

import pytest
import trio
import trio.testing

from bench.dht_sim import Swarm
from dht.ids import key_id, node_id
from dht.node import DHTConfig
from p2p.sim import SimWorld


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.mark.slow
async def test_1000_peers_with_10_percent_killed(autojump_clock):
    wall = time.perf_counter()
    rng = random.Random(7)
    async with SimWorld.open(seed=7) as world:
        async with trio.open_nursery() as nursery:
            swarm = Swarm(world, nursery, DHTConfig(), rng)
            await swarm.grow(1000, wave=100)
            joined = time.perf_counter() - wall
            keys = [f"svc/{i}" for i in range(40)]
            async with trio.open_nursery() as tmp:
                for key in keys:
                    tmp.start_soon(lambda k=key: rng.choice(swarm.nodes).store(k, {"k": k}, ttl=3600))
            for node in rng.sample(swarm.nodes, 100):
                swarm.crash(node)
            alive = swarm.alive
            assert len(alive) == 900

            ok = 0
            tried = 200

            async def read(reader, key):
                nonlocal ok
                got = await reader.get(key)
                if got and all(e.value == {"k": key} for e in got.values()):
                    ok += 1

            async with trio.open_nursery() as tmp:
                for i in range(tried):
                    tmp.start_soon(read, rng.choice(alive), keys[i % len(keys)])
            assert ok / tried >= 0.99, f"{ok}/{tried} lookups succeeded"

            # walks return the true k closest live peers
            live_ids = [(node_id(n.peer_id), n.peer_id) for n in alive if not n.client_mode]
            exact = 0
            overlap = []
            for i in range(20):
                target = key_id(f"target/{i}")
                want = {pid for _, pid in sorted(live_ids, key=lambda t: t[0] ^ target)[:20]}
                looker = rng.choice(alive)
                got = {c.peer_id for c in await looker.find_closest(target)}
                got.discard(looker.peer_id)
                want.discard(looker.peer_id)
                overlap.append(len(got & want) / len(want))
                exact += got >= want
            print(f"1000 peers: join {joined:.0f} s wall, reads {ok}/{tried}, k-closest exact {exact}/20, "
                  f"mean overlap {sum(overlap) / len(overlap):.3f}, total {time.perf_counter() - wall:.0f} s wall")
            assert exact >= 18 and min(overlap) >= 0.9
            nursery.cancel_scope.cancel()
