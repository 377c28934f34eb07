"""A server whose connection broke while it is still reachable is no faulty server (issue #16): the
client opens a new session with it — at another of its announced addresses where the one in use died
or hangs (a relay) — replays the history there and goes on, with the same output and no ban. Once per
server and session: a server whose stream breaks again is banned and replaced like any fault."""

from __future__ import annotations

import signal
import subprocess
import sys
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from pipeline.announce import fetch_servers
from pipeline.client import ClientConfig, DistributedModel
from testkit.swarms import start_block_server, start_dhts, stream_with, swarm

PROMPT = [5, 17, 42, 8, 99, 3]


def cut(s, client) -> None:
    """The simulator drops every connection of `client` (no peer crashes) and lets it dial again."""
    s.world.partition([client.network.peer_id])
    s.world.heal()


async def test_the_only_server_of_a_span_whose_connection_broke_is_reached_again_not_banned(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 16)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4)], model_id=mid) as s:
            model = await s.client(spot_check=None, step_timeout=10.0)
            [server] = s.servers

            async def cut_at_5(ev):
                if ev.index == 5:
                    cut(s, s.clients[0])

            tokens, g = await stream_with(model, PROMPT, 16, cut_at_5)
            assert tokens == want
            assert g.recoveries == 1 and [p for p, _, _ in g.route] == [server.network.peer_id]
            assert server.network.peer_id not in model.sequence.banned()


async def test_a_server_whose_stream_breaks_a_second_time_in_a_session_is_banned_and_replaced(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 16)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4), (0, 4)], model_id=mid) as s:
            model = await s.client(spot_check=None, step_timeout=10.0)
            first = None

            async def cut_at_3_and_9(ev):
                nonlocal first
                if ev.index == 3:
                    first = ev.route[0][0]
                if ev.index in (3, 9):
                    cut(s, s.clients[0])

            tokens, g = await stream_with(model, PROMPT, 16, cut_at_3_and_9)
            assert tokens == want
            assert g.recoveries == 2
            assert first in model.sequence.banned()  # reached again once, then banned
            assert [p for p, _, _ in g.route] != [first]


async def _relay(stop: trio.Event, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], relay_service=True) as relay:
        task_status.started(relay.listen_addrs()[0])
        await stop.wait()


@asynccontextmanager
async def served_through_relays(llama, relays: list[str], monkeypatch, step_timeout: float):
    """A server of blocks [0, 4) reserved on `relays` announcing its circuits only (as behind a NAT), and a
    client's model that knows it from the DHT: (the client's network, the server's peer id, its circuits,
    the model)."""
    path, mid, _ = llama
    async with AsyncExitStack() as stack:
        boot_net, client_net = [
            await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"],
                                                               hole_punch=False))
            for _ in range(2)]
        server_net = await stack.enter_async_context(Libp2pNetwork.open(
            Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], relays=relays, hole_punch=False))
        while len([a for a in server_net.announce_addrs() if "/p2p-circuit/" in a]) < len(relays):
            await trio.sleep(0.05)
        circuits = [a for a in server_net.announce_addrs() if "/p2p-circuit/" in a]
        monkeypatch.setattr(server_net, "announce_addrs", lambda: circuits)
        async with trio.open_nursery() as nursery:
            server_dht, client_dht = await start_dhts(nursery, boot_net, [server_net, client_net])
            await start_block_server(nursery, server_net, server_dht, path, 0, 4, mid)
            [info] = await fetch_servers(client_dht, mid)
            assert sorted(info.addrs) == sorted(circuits)
            model = await DistributedModel.from_pretrained(path, client_net, client_dht, model_id=mid,
                                                           config=ClientConfig(spot_check=None, step_timeout=step_timeout))
            yield client_net, server_net.peer_id, circuits, model
            nursery.cancel_scope.cancel()


async def test_a_generation_survives_the_death_of_the_relay_its_only_server_is_reached_through(llama, monkeypatch):
    """Real sockets on loopback: a server reserved on two relays announces its two circuits only (as
    behind a NAT); the relay the client reached it through dies mid-generation; the client reaches it
    through the other, replays there, and the generation ends as an undisturbed one, the server unbanned."""
    local = llama[2]
    want = local.generate_greedy(PROMPT, 16)
    with trio.fail_after(120):
        async with trio.open_nursery() as relays_nursery:
            stops = [trio.Event(), trio.Event()]
            relays = [await relays_nursery.start(_relay, stop) for stop in stops]
            async with served_through_relays(llama, relays, monkeypatch, 10.0) as (client_net, peer, circuits, model):
                used = None

                async def kill_its_relay_at_5(ev):
                    nonlocal used
                    if ev.index == 5:
                        assert client_net.connection_kinds(peer) == ["relayed"]
                        used = client_net.address_of(peer)
                        stops[relays.index(used.partition("/p2p-circuit")[0])].set()
                        while peer in client_net.connected_peers():  # the relay's connections are gone
                            await trio.sleep(0.05)

                tokens, g = await stream_with(model, PROMPT, 16, kill_its_relay_at_5)
                assert tokens == want
                assert g.recoveries == 1 and [p for p, _, _ in g.route] == [peer]
                assert peer not in model.sequence.banned()
                assert client_net.address_of(peer) == next(a for a in circuits if a != used)
            for stop in stops:
                stop.set()


RELAY_PROCESS = """
import trio
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork

async def main():
    async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"], relay_service=True) as relay:
        print(relay.listen_addrs()[0], flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


async def test_a_generation_survives_a_hung_relay_its_only_server_is_reached_through(llama, monkeypatch):
    """As above, but the relay in use hangs (its process stopped: connections stay open, nothing moves)
    rather than dies: the step times out, and a timeout through relays only is the transport's as
    much as the server's. The client drops the hung connection, reaches the server through the other
    relay, replays there; identical output, the server unbanned (banned, with no other server of
    the span, before)."""
    local = llama[2]
    want = local.generate_greedy(PROMPT, 16)
    procs = [subprocess.Popen([sys.executable, "-c", RELAY_PROCESS], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        with trio.fail_after(120):
            relays = [(await trio.to_thread.run_sync(p.stdout.readline)).strip() for p in procs]
            assert all("/p2p/" in r for r in relays), relays
            async with served_through_relays(llama, relays, monkeypatch, 5.0) as (client_net, peer, circuits, model):
                used = None

                async def hang_its_relay_at_5(ev):
                    nonlocal used
                    if ev.index == 5:
                        assert client_net.relayed(peer)
                        used = client_net.address_of(peer)
                        procs[relays.index(used.partition("/p2p-circuit")[0])].send_signal(signal.SIGSTOP)

                tokens, g = await stream_with(model, PROMPT, 16, hang_its_relay_at_5)
                assert tokens == want
                assert g.recoveries == 1 and [p for p, _, _ in g.route] == [peer]
                assert peer not in model.sequence.banned()
                assert client_net.address_of(peer) == next(a for a in circuits if a != used)
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait()
