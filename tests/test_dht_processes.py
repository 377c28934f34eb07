"""The DHT across 12 real `potluck serve` processes on 127.0.0.1: subkeys from several owners, finding
peers, expiry, and forged entries refused."""

import time

import pytest
import trio

from dht.protocol import PROTOCOL
from dht.records import SignedValue
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from potluck.localswarm import PeerProcess, wait_until

pytestmark = pytest.mark.slow

N = 12


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("dht-swarm")
    peers = [PeerProcess(root / "peer0")]
    try:
        peers[0].start()
        for i in range(1, N):
            peers.append(PeerProcess(root / f"peer{i}", "--bootstrap", peers[0].addr))
            peers[-1].start()
        wait_until(lambda: all(p.call("status")["dht"]["ready"] for p in peers), 60, message="every DHT ready")
        yield peers
    finally:
        for p in peers:
            p.close()


def test_dht_across_processes(swarm):
    owners, reader = swarm[3:6], swarm[-1]
    key = "blocks/test-model/12"
    for i, owner in enumerate(owners):
        assert owner.call("dht_store", key=key, value={"span": [12, 18], "n": i}, ttl=300)["stored_at"] > 0
    entries = wait_until(lambda: (e := reader.call("dht_get", key=key)) and len(e) == 3 and e, 20,
                         message="all three owners' entries")
    assert set(entries) == {o.peer_id for o in owners}
    assert sorted(e["value"]["n"] for e in entries.values()) == [0, 1, 2]

    # Finding a peer that the asker has never talked to directly.
    target = swarm[7]
    assert swarm[1].call("dht_find_peer", peer_id=target.peer_id)["addr"].endswith(f"/p2p/{target.peer_id}")

    # Records expire everywhere.
    owners[0].call("dht_store", key="short-lived", value=1, ttl=2)
    assert owners[0].peer_id in reader.call("dht_get", key="short-lived")
    time.sleep(3)
    assert reader.call("dht_get", key="short-lived") == {}


async def test_forged_entries_are_refused(swarm):
    victim_owner = swarm[4]
    key = "blocks/test-model/3"
    attacker = Identity.generate()
    async with Libp2pNetwork.open(attacker) as net:
        target = swarm[2]
        await net.connect(target.addr)
        info = {"c": [0.0, 0.0, 0.0, 1.0], "l": [], "a": None}
        forged = SignedValue.create(attacker, key, {"span": [0, 30]}, net.now() + 300).wire()
        forged[0] = victim_owner.peer_id  # an entry claiming another owner's subkey, signed by us
        expired = SignedValue.create(attacker, key, {"span": [0, 30]}, net.now() - 10).wire()
        bad_sig = SignedValue.create(attacker, key, {"span": [0, 30]}, net.now() + 300).wire()
        bad_sig[3] = b"\1" * 64
        for entry in (forged, expired, bad_sig):  # well-formed on the wire, so refused per entry
            reply = await net.request(target.peer_id, PROTOCOL, {"op": "store", "i": info, "k": key, "e": [entry]})
            assert reply["ok"] == [False]
    for p in (target, swarm[-1]):
        assert await trio.to_thread.run_sync(lambda: p.call("dht_get", key=key)) == {}
