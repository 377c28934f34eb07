"""The swarm's capacity as a peer shows it (potluck/swarmview.py): Sybil announcements of huge cache and
throughput at dead addresses do not count, in the view alone and on a real `potluck serve` process."""

import httpx
import trio

from dht import protocol as kad
from dht.records import SignedValue
from dht.vivaldi import Coord
from p2p import framing
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from pipeline.announce import ServerInfo, announce_key
from pipeline.identity import model_id
from pipeline.loading import ModelFolder
from potluck.localswarm import PeerProcess, wait_until
from potluck.swarmview import coverage_view

HUGE = 1 << 20


def fake(identity: Identity, blocks: int, t: float, model_name: str = "") -> ServerInfo:
    """A server of every block, faster and roomier than any real one, where nothing listens."""
    return ServerInfo(identity.peer_id, 0, blocks, 1e6, 1e7, HUGE, t=t, addrs=(f"/ip4/127.0.0.1/tcp/1/p2p/{identity.peer_id}",),
                      num_blocks=blocks, model_name=model_name)


def test_capacity_counts_only_servers_reached():
    real = ServerInfo("real", 0, 4, 5.0, 50.0, 300, t=1.0)
    half = ServerInfo("half", 0, 2, 2.0, 20.0, 900, t=1.0)
    sybils = [fake(Identity.generate(), 4, 1.0) for _ in range(3)]
    view = coverage_view([real, half, *sybils], 4, {"real", "half"}.__contains__)
    assert view["replicas"] == [5, 5, 4, 4]  # what is announced
    assert view["max_request_tokens"] == 300  # block 2 and 3: the real server's room, not 1<<20
    assert view["throughput"] == [7.0, 7.0, 5.0, 5.0]
    assert [s["reached"] for s in view["servers"] if s["peer_id"] in ("real", "half")] == [True, True]
    assert not any(s["reached"] for s in view["servers"] if s["peer_id"] not in ("real", "half"))
    # a block no reached server holds: the longest request is not known
    assert coverage_view([half, *sybils], 4, {"half"}.__contains__)["max_request_tokens"] is None
    assert coverage_view([real, *sybils], 4)["max_request_tokens"] == HUGE  # believing every announcement


async def store_sybils(addr: str, peer_id: str, key: str, blocks: int, model_name: str, n: int) -> int:
    """`n` fresh keys each storing a fake announcement at the peer; how many it took."""
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as net:
        await net.connect(addr, timeout=10)
        stored = 0
        for _ in range(n):
            identity = Identity.generate()
            info = fake(identity, blocks, net.now(), model_name)
            entry = SignedValue.create(identity, key, info.to_value(), net.now() + 600)
            reply = await net.request(peer_id, kad.PROTOCOL, {"op": "store", "i": kad.encode_info(Coord(), [], None),
                                                              "k": key, "e": [entry.wire()]}, timeout=10)
            stored += sum(1 for ok in framing.field(framing.expect_map(reply), "ok", list) if ok is True)
        return stored


def test_a_serving_peer_shows_its_own_room_not_sybils_huge_cache(llama_folder, tmp_path):
    blocks = ModelFolder(llama_folder).config.num_layers
    server = PeerProcess(tmp_path / "server", "--model", str(llama_folder), "--threads", "1", "--blocks", f"0:{blocks}",
                         "--cache-mb", "4", "--api", "127.0.0.1:0").start(timeout=180)
    try:
        api = server.call("status")["api"]
        with httpx.Client(base_url=api, timeout=60) as http:
            def model() -> dict:
                return http.get("/v1/models").json()["data"][0]["potluck"]

            own = wait_until(lambda: model()["max_request_tokens"], 60, 0.5, message="the server's own announcement")
            assert own < HUGE
            key = announce_key(model_id(llama_folder))
            assert trio.run(store_sybils, server.addr, server.peer_id, key, blocks, llama_folder.name, 4) == 4
            seen = wait_until(lambda: (m := model())["replicas"][0] >= 5 and m, 30, 0.5,
                              message="the Sybils' announcements in the view")
            assert seen["max_request_tokens"] == own  # not 1<<20
            assert max(seen["throughput"]) < 1e6
    finally:
        server.close()
