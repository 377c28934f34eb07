"""dht/ on the simulator under virtual time: real protocol code, real signatures, no mocks."""

import itertools
import random
import statistics

import pytest
import trio
import trio.testing

from bench.dht_sim import Swarm, black_holes, pct, random_place, turn_liar, vivaldi_error
from dht import protocol as proto
from dht.ids import key_id, node_id
from dht.node import DHTConfig
from dht.records import SignedValue, StoreLimits, signing_bytes
from dht.vivaldi import Coord
from p2p.errors import RemoteError

pytestmark = pytest.mark.slow  # about 45 s
from p2p.identity import Identity
from p2p.sim import LatencyModel, Place, SimWorld


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def swarm_of(world, nursery, n, *, seed=0, config=None, place_fn=None, wave=50, hints=False):
    swarm = Swarm(world, nursery, config or DHTConfig(), random.Random(seed), hint_regions=hints)
    await swarm.grow(n, wave=wave, place_fn=place_fn)
    return swarm


async def test_put_get_subkeys_from_several_owners_expiry_and_forgeries(autojump_clock):
    async with SimWorld.open(seed=1) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 40, seed=1)
            owners, reader = swarm.nodes[3:6], swarm.nodes[30]
            for i, owner in enumerate(owners):
                assert await owner.store("blocks/m/12", {"span": [12, 18], "n": i}, ttl=60) > 0
            got = await reader.get("blocks/m/12", exhaustive=True)
            assert set(got) == {o.peer_id for o in owners}
            assert sorted(e.value["n"] for e in got.values()) == [0, 1, 2]
            assert all(e.owner == sub for sub, e in got.items())
            # a secure read walks disjoint paths and agrees
            assert set(await reader.get("blocks/m/12", secure=True, exhaustive=True)) == set(got)
            # the default (Coral) read returns the nearest copies: a non-empty subset
            assert set(await swarm.nodes[12].get("blocks/m/12")) <= set(got)

            # forged and foreign entries are refused by holders, over the wire
            holder = (await reader.find_closest(key_id("blocks/m/12")))[0]
            alice, mallory = owners[0].network.identity, Identity(b"\x66" * 32)
            exp = world.nodes[0].now() + 60
            raw = b"\xa4evil"
            forged = [alice.peer_id, raw, exp, alice.sign(signing_bytes("blocks/m/12", alice.peer_id, b"\xa3xyz", exp))]
            foreign = [alice.peer_id, raw, exp, mallory.sign(signing_bytes("blocks/m/12", alice.peer_id, raw, exp))]
            expired = SignedValue.create(mallory, "blocks/m/12", "late", world.nodes[0].now() - 1).wire()
            attacker = swarm.nodes[7]
            body = {"op": "store", "i": attacker._info(), "k": "blocks/m/12", "e": [forged, foreign, expired]}
            reply = await attacker.network.request(holder.peer_id, proto.PROTOCOL, body)
            assert reply["ok"] == [False, False, False]
            got = await swarm.nodes[20].get("blocks/m/12", quorum=3, exhaustive=True)
            assert {e.value["n"] for e in got.values()} == {0, 1, 2}
            # malformed requests get a clear refusal
            with pytest.raises(RemoteError, match="BadRequest"):
                await attacker.network.request(holder.peer_id, proto.PROTOCOL, {"op": "find_node", "i": attacker._info(), "t": b"x"})

            # find_peer
            target = swarm.nodes[11]
            assert await swarm.nodes[25].find_peer(target.peer_id) == target.addr

            # entries expire at every holder (owners stop republishing first)
            for owner in owners:
                owner._owned.clear()
            await trio.sleep(61)
            assert await reader.get("blocks/m/12") == {}
            nursery.cancel_scope.cancel()


async def test_a_holder_refuses_one_peers_flood_but_takes_a_genuine_announcement(autojump_clock):
    limits = StoreLimits(owner_values=8, sender_values=16, owner_subkeys=2, max_subkeys=8)
    async with SimWorld.open(seed=4) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 8, seed=4, config=DHTConfig(store_limits=limits))
            attacker, holder, server = swarm.nodes[1], swarm.nodes[2], swarm.nodes[3]
            now = world.nodes[0].now()

            async def send(key, entries):
                body = {"op": "store", "i": attacker._info(), "k": key, "e": [e.wire() for e in entries]}
                return (await attacker.network.request(holder.peer_id, proto.PROTOCOL, body))["ok"]

            # one owner's records: its share, then refused
            oks = [(await send(f"junk/{i}", [SignedValue.create(attacker.network.identity, f"junk/{i}", i, now + 600)]))[0]
                   for i in range(12)]
            assert oks == [True] * 8 + [False] * 4
            # many owners' subkeys on an announcement record, all sent by one peer
            sybils = [Identity(bytes([7, i]) + b"\x01" * 30) for i in range(6)]
            key = "blocks/m/3"
            oks = await send(key, [SignedValue.create(s, key, "squat", now + 600, suffix=f"{j}") for s in sybils[:4]
                                   for j in range(3)])
            assert oks == [True, True, False] * 4  # two subkeys per owner
            # the sender's share (16) is spent: other owners' entries from it are refused too
            assert await send("other/1", [SignedValue.create(sybils[5], "other/1", 1, now + 600)]) == [False]
            assert len(holder.records.get(key, now)) == 8  # the record is full
            # a genuine server's announcement still gets in, in place of a largest holder's entry
            genuine = SignedValue.create(server.network.identity, key, {"span": [3, 6]}, now + 60)
            body = {"op": "store", "i": server._info(), "k": key, "e": [genuine.wire()]}
            assert (await server.network.request(holder.peer_id, proto.PROTOCOL, body))["ok"] == [True]
            assert server.peer_id in holder.records.get(key, now)
            nursery.cancel_scope.cancel()


async def test_owner_republishes_before_expiry(autojump_clock):
    cfg = DHTConfig(maintenance_interval=10.0)
    async with SimWorld.open(seed=2) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 25, seed=2, config=cfg)
            owner = swarm.nodes[4]
            await owner.store("peers/x", "v1", ttl=40)
            await trio.sleep(120)  # three TTLs: only republishing keeps it alive
            got = await swarm.nodes[20].get("peers/x")
            assert [e.value for e in got.values()] == ["v1"]
            assert got[owner.peer_id].expires > world.nodes[0].now()
            nursery.cancel_scope.cancel()


async def test_hostile_peers_fake_contacts_and_silence(autojump_clock):
    """One peer answers every lookup with 40 fake contacts close to the target, another never answers."""
    async with SimWorld.open(seed=3) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 60, seed=3)
            for node in swarm.nodes[:20]:
                await node.store(f"k/{node.peer_id[-6:]}", 1, ttl=600)
            liar, mute = swarm.nodes[1], swarm.nodes[2]
            fakes = [Identity(random.Random(i).randbytes(32)) for i in range(200)]

            async def lie(sender, body):
                req = proto.decode_request(sender, body)
                target = req.target if req.op == "find_node" else key_id(req.key)
                closest = sorted(fakes, key=lambda f: node_id(f.peer_id) ^ target)[: proto.MAX_CONTACTS]
                contacts = [[f.peer_id, f"/sim/{90000 + i}/p2p/{f.peer_id}", Coord(0.0, 0.0, 0.0001, 0.01).wire()]
                            for i, f in enumerate(closest)]
                return {"i": liar._info(), "n": contacts, "e": []}

            async def silent(sender, body):
                await trio.sleep_forever()

            liar.network.set_request_handler(proto.PROTOCOL, lie)
            mute.network.set_request_handler(proto.PROTOCOL, silent)
            ok = 0
            for node in swarm.nodes[:20]:
                reader = swarm.nodes[(swarm.nodes.index(node) + 17) % 60]
                start = trio.current_time()
                if await reader.get(f"k/{node.peer_id[-6:]}"):
                    ok += 1
                assert trio.current_time() - start < 5
            assert ok == 20
            nursery.cancel_scope.cancel()


async def test_liars_flooding_black_hole_contacts_barely_slow_honest_gets(autojump_clock):
    """A tenth of 100 peers answer every lookup with 40 fake contacts close to the target whose dials
    are never answered, claiming they are far away (on real processes this took honest gets from
    0.03 s to 7–12 s). They sit where they hurt most, like Sybils placed by id: every key read is one
    whose closest peer is a liar; values have 4 replicas and reads want 3 holders, as announcement
    reads do, so a read walks on past the first holder. Every honest get still succeeds; median, 90th
    percentile and mean stay within 2× of the same swarm's without liars (unprotected: median 2.2×,
    p90 40×, mean 21×); no fake enters a table."""
    rng = random.Random(1007)
    async with SimWorld.open(seed=7, latency=LatencyModel(jitter=0.1, seed=7)) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 100, seed=7, config=DHTConfig(k=8, replicas=4))
            await swarm.settle(1)
            shuffled = rng.sample(swarm.nodes, len(swarm.nodes))
            liars, readers, owners = shuffled[:10], shuffled[10:50], shuffled[50:]
            liar_ids = {liar.peer_id for liar in liars}

            def near_a_liar(prefix: str) -> str:
                for j in itertools.count():
                    target = key_id(f"{prefix}/{j}")
                    if min(swarm.nodes, key=lambda n: n.node_id ^ target).peer_id in liar_ids:
                        return f"{prefix}/{j}"
                raise AssertionError("unreachable")

            keys = {phase: [near_a_liar(f"liars/{phase}/{i}") for i in range(len(readers))] for phase in ("honest", "attacked")}

            async def store(owner, key: str) -> None:
                # one of 80 stores at once now and then lands on a single peer, none of the closest (one key in
                # ~20 runs; CI saw it): the reads are what this test measures, so a value is stored again until
                # 3 of its 4 closest peers hold it, as the republish that the test turns off would
                closest = sorted(swarm.nodes, key=lambda node: node.node_id ^ key_id(key))[:4]
                for _ in range(3):
                    await owner.store(key, "v", ttl=3600, republish=False)
                    if sum(key in node.records.keys() for node in closest) >= 3:
                        return

            async with trio.open_nursery() as tmp:
                for key in keys["honest"] + keys["attacked"]:
                    tmp.start_soon(store, rng.choice(owners), key)

            async def read_all(phase: str) -> list[float]:
                latencies: list[float] = []

                async def read(reader, key):
                    start = trio.current_time()
                    if (await reader.lookup_value(key, quorum=3, use_local=False, levels=[0], select="xor")).found:
                        latencies.append(trio.current_time() - start)

                async with trio.open_nursery() as tmp:
                    for reader, key in zip(readers, keys[phase]):
                        tmp.start_soon(read, reader, key)
                return latencies

            honest = await read_all("honest")
            fakes = set()
            for liar in liars:
                holes = black_holes(world, rng, 200)
                fakes |= {peer_id for peer_id, _ in holes}
                turn_liar(liar, holes)
            attacked = await read_all("attacked")
            figures = {name: (round(f(honest), 3), round(f(attacked), 3)) for name, f in (
                ("median", statistics.median), ("p90", lambda v: pct(v, 0.9)), ("mean", statistics.mean))}
            print(f"without / with liars: {figures}; found {len(honest)}/{len(readers)} and {len(attacked)}/{len(readers)}")
            assert len(honest) == len(attacked) == len(readers), figures
            assert all(with_ <= 2 * without for without, with_ in figures.values()), figures
            assert not any(c.peer_id in fakes for node in swarm.nodes for t in node.tables.values() for c in t.contacts())
            nursery.cancel_scope.cancel()


async def test_client_mode_queries_but_never_enters_tables(autojump_clock):
    async with SimWorld.open(seed=4) as world:
        async with trio.open_nursery() as nursery:
            swarm = await swarm_of(world, nursery, 20, seed=4)
            client = await swarm.add(random_place(swarm.rng), [swarm.nodes[0].addr], client_mode=True)
            await swarm.nodes[5].store("svc/a", "hello", ttl=60)
            assert [e.value for e in (await client.get("svc/a")).values()] == ["hello"]
            assert await client.store("svc/b", "mine", ttl=60) > 0
            assert all(client.peer_id not in t for n in swarm.nodes[:20] for t in n.tables.values())
            status = client.status()
            assert status["client_mode"] and status["ready"] and status["table"]["0"] > 0
            nursery.cancel_scope.cancel()


REGIONS3 = {"eu-central": (50.1, 8.7), "us-east": (39.0, -77.5), "jp": (35.7, 139.7), "in-west": (19.1, 72.9)}


async def test_regions_form_level2_clusters_and_vivaldi_converges(autojump_clock):
    rng = random.Random(5)
    names = list(REGIONS3)

    def place():
        region = rng.choice(names)
        lat, lon = REGIONS3[region]
        return Place(lat + rng.gauss(0, 0.5), lon + rng.gauss(0, 0.5), region, rng.uniform(2.0, 5.0))

    async with SimWorld.open(seed=5) as world:
        async with trio.open_nursery() as nursery:
            # peers give a --region hint: it seeds their coordinate; samples refine it
            # (convergence from nothing is tested in test_dht_units on a synthetic space)
            config = DHTConfig(cluster_label_max_age=120.0)
            swarm = await swarm_of(world, nursery, 200, seed=5, place_fn=place, hints=True, config=config)
            await swarm.settle(4)
            err = vivaldi_error(swarm, 3000)
            print(f"Vivaldi median relative error after join + 4 rounds: {err:.1%}")
            assert err < 0.15
            main_label = {}
            for region in names:
                members = [n for n in swarm.nodes if swarm.region_of[n.peer_id] == region]
                labels = [n.clusters[2] for n in members]
                top = statistics.mode(labels)
                share = labels.count(top) / len(labels)
                print(f"{region}: {len(members)} peers, {share:.0%} in level-2 cluster {top[-8:]}")
                assert share >= 0.95
                main_label[region] = top
                # the clusters' routing tables hold only members
                for n in members[:5]:
                    assert all(swarm.region_of[c.peer_id] == region for c in n.tables[2].contacts())
            assert len(set(main_label.values())) == len(names)
            # an in-region key is found inside the level-2 cluster, without leaving it
            eu = [n for n in swarm.nodes if swarm.region_of[n.peer_id] == "eu-central"]
            levels = []
            for i in range(8):
                await eu[i].store(f"near/{i}", "x", ttl=600)
                result = await eu[-1 - i].lookup_value(f"near/{i}", use_local=False)
                assert result.found
                levels.append(result.level)
            print("levels where in-region keys were found:", levels)
            assert levels.count(2) >= 7

            # eu's landmark leaves: without its word the label ages out (max_age 120 s here) and eu
            # elects a new one; the other regions keep theirs
            landmark = next(n for n in swarm.nodes if n.peer_id == main_label["eu-central"])
            swarm.crash(landmark)
            await trio.sleep(400)  # virtual: about 13 maintenance rounds
            for region in names:
                labels = [n.clusters[2] for n in swarm.alive if swarm.region_of[n.peer_id] == region]
                top = statistics.mode(labels)
                print(f"after eu's landmark left, {region}: {labels.count(top) / len(labels):.0%} in {top[-8:]}")
                assert labels.count(top) / len(labels) >= 0.95
                assert (top != main_label[region]) == (region == "eu-central")
            nursery.cancel_scope.cancel()
