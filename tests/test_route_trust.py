"""Client routing trust against live fakes (issue #13): a peer that announces a span of huge throughput,
accepts connections and the inference stream, and never answers "open". Being connected is no proof
of serving: routes do not believe its announcement over servers reached, the first open of a server
never reached has a short timeout and a mute one is left out like a dead address (no ban), and the
capacity view does not count it — on the in-process libp2p swarm and on a real `potluck serve`."""

from __future__ import annotations

from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator

import httpx
import pytest
import trio

from dht import protocol as kad
from dht.records import SignedValue
from dht.vivaldi import Coord
from p2p import framing
from p2p.errors import StreamClosed
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.network import Stream
from pipeline import protocol as proto
from pipeline.announce import ServerInfo, announce_key
from pipeline.identity import model_id
from pipeline.loading import ModelFolder
from pipeline.routing import RoutingConfig, find_route
from potluck.localswarm import PeerProcess, wait_until
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
HUGE = 1 << 20


def test_a_strangers_span_and_throughput_buy_no_trust():
    """Two servers we are connected to (never opened) carry blocks [0, 4) in two hops; strangers announce
    all four at a million tokens/s. Their one hop saves no penalty (it is charged per block), and one
    we have not even dialled costs more than one we are connected to."""
    honest = [ServerInfo("head", 0, 2, 100.0, 1000.0, 4096), ServerInfo("tail", 2, 4, 100.0, 1000.0, 4096)]
    fakes = [ServerInfo(f"sybil{i}", 0, 4, 1e6, 1e7, HUGE) for i in range(50)]
    connected = {"head", "tail"}.__contains__
    route = find_route([*honest, *fakes], 0, 4, rtt=lambda p: 0.03, verified=lambda p: False, dialled=connected)
    assert [h.peer_id for h in route] == ["head", "tail"]
    # once reached, the servers win over strangers we are connected to as well
    route = find_route([*honest, *fakes], 0, 4, rtt=lambda p: 0.03, verified=connected, dialled=lambda p: True)
    assert [h.peer_id for h in route] == ["head", "tail"]


@dataclass
class MuteServer:
    """A live peer announcing blocks [0, blocks) at a million tokens/s that never answers a session."""

    network: Libp2pNetwork
    opens: int = 0  # inference streams opened to it

    @property
    def peer_id(self) -> str:
        return self.network.peer_id

    async def _hold(self, stream: Stream) -> None:
        self.opens += 1
        try:
            while True:
                await stream.receive()  # the "open", then nothing until the client gives up
        except StreamClosed:
            pass

    async def announce(self, holders: list[str], key: str, blocks: int, model_name: str | None = None) -> None:
        """Store its signed announcement, at its own live address, in the DHT of each peer at `holders`."""
        net = self.network
        info = ServerInfo(net.peer_id, 0, blocks, 1e6, 1e7, HUGE, t=net.now(), addrs=tuple(net.listen_addrs()),
                          num_blocks=blocks, model_name=model_name)
        entry = SignedValue.create(net.identity, key, info.to_value(), net.now() + 600)
        for addr in holders:
            holder = await net.connect(addr, timeout=10)
            reply = await net.request(holder, kad.PROTOCOL, {"op": "store", "i": kad.encode_info(Coord(), [], None),
                                                             "k": key, "e": [entry.wire()]}, timeout=10)
            assert framing.field(framing.expect_map(reply), "ok", list) == [True]


@asynccontextmanager
async def mute_servers(n: int) -> AsyncIterator[list[MuteServer]]:
    async with trio.open_nursery() as nursery:
        fakes: list[MuteServer] = []
        done = trio.Event()

        async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
            async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as net:
                fake = MuteServer(net)
                net.set_stream_handler(proto.INFERENCE, fake._hold)
                task_status.started(fake)
                await done.wait()

        for _ in range(n):
            fakes.append(await nursery.start(run))
        try:
            yield fakes
        finally:
            done.set()


async def test_mute_fakes_cost_a_short_open_each_no_ban_and_never_win_over_servers_reached(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 6)
    with trio.fail_after(240):
        async with swarm("libp2p", path, [(0, 2), (2, 4)], model_id=mid) as s, mute_servers(3) as fakes:
            # a full open timeout far longer than this test's bound: only the short first open keeps it
            timeouts = dict(open_timeout=600.0, first_open_timeout=1.0)
            known = await s.client(**timeouts)
            assert (await known.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])).token_ids == want
            honest = {p.network.peer_id for p in s.servers}
            assert known.sequence.reached == honest

            holders = [p.network.listen_addrs()[0] for p in s.servers]
            for fake in fakes:
                await fake.announce(holders, announce_key(mid), 4)
            cold = await s.client(**timeouts)
            for model, peer in ((known, s.clients[0]), (cold, s.clients[1])):
                # no RTT sets the servers apart: every fake looks cheaper than the live servers' two hops
                model.sequence.config = RoutingConfig(default_rtt=0.0)
                for fake in fakes:
                    await fake.network.connect(peer.network.listen_addrs()[0], timeout=10)
                await model.sequence.refresh(force=True)
                assert {f.peer_id for f in fakes} <= {i.peer_id for i in model.sequence.servers}

            g = await known.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
            assert g.token_ids == want and {p for p, _, _ in g.route} == honest
            assert {f.peer_id for f in fakes} <= known.sequence.contacted  # connected, yet not believed
            assert [f.opens for f in fakes] == [0, 0, 0]

            with trio.fail_after(60):  # three first opens of 1 s; with the full open timeout, 600 s each
                g = await cold.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
            assert g.token_ids == want and {p for p, _, _ in g.route} == honest
            assert [f.opens for f in fakes] == [1, 1, 1]  # each tried once, then left out
            assert {f.peer_id for f in fakes} <= set(cold.sequence.unreachable)
            assert not cold.sequence.banned() and cold.sequence.dials_failed == 3
            assert cold.sequence.reached == honest


@pytest.fixture
def serving_peer(llama_folder, tmp_path):
    blocks = ModelFolder(llama_folder).config.num_layers
    server = PeerProcess(tmp_path / "server", "--model", str(llama_folder), "--threads", "1", "--blocks", f"0:{blocks}",
                         "--cache-mb", "4", "--api", "127.0.0.1:0").start(timeout=180)
    try:
        yield server, blocks
    finally:
        server.close()


async def test_a_connected_fake_does_not_count_in_a_real_peers_capacity_view(serving_peer, llama_folder):
    server, blocks = serving_peer
    api = (await trio.to_thread.run_sync(server.call, "status"))["api"]

    def view() -> dict:
        with httpx.Client(base_url=api, timeout=60) as http:
            return http.get("/v1/models").json()["data"][0]["potluck"]

    def poll(ready, what: str) -> dict:
        return wait_until(lambda: v if ready(v := view()) else None, 60, 0.5, message=what)

    own = (await trio.to_thread.run_sync(poll, lambda v: v["max_request_tokens"], "the server's own room"))
    own = own["max_request_tokens"]
    assert own < HUGE
    with trio.fail_after(120):
        async with mute_servers(1) as (fake,):
            await fake.announce([server.addr], announce_key(model_id(llama_folder)), blocks, llama_folder.name)
            seen = await trio.to_thread.run_sync(poll, lambda v: v["replicas"][0] >= 2, "the fake in the view")
            assert seen["max_request_tokens"] == own  # not 1<<20: the connected fake is not counted
            assert max(seen["throughput"]) < 1e6
            status = await trio.to_thread.run_sync(server.status)
            assert fake.peer_id in status["connected"]
            listed = {s["peer_id"]: s["reached"] for s in status["models"][0]["coverage"]["servers"]}
            assert listed == {server.peer_id: True, fake.peer_id: False}
