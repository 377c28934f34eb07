"""Swarms of BlockServers + clients for the pipeline tests, on the simulator or on real libp2p sockets.

    async with swarm("sim", folder, [(0, 2), (2, 4)], model_id=mid) as s:
        model = await s.client()
        ...
        await s.kill(s.servers[0])   # sim: crash; libp2p: close that peer's network
"""

from __future__ import annotations

from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import trio

from dht.node import DHTConfig, DHTNode
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.sim import Place, SimWorld
from pipeline.client import ClientConfig, DistributedModel, Finished, Generation, TokenEvent
from pipeline.server import BlockServer, ServerConfig

FIXED_TP = {"decode_tps": 1000.0, "prefill_tps": 10000.0}
HERE = Place(50.0, 8.0, "eu-west", last_mile_ms=0.5)
DHT_CFG = dict(request_timeout=2.0, cluster_thresholds={}, bootstrap_retry=0.5)


@dataclass
class Peer:
    network: Any
    dht: DHTNode
    scope: trio.CancelScope
    server: BlockServer | None = None
    alive: bool = True
    done: trio.Event = field(default_factory=trio.Event)


@dataclass
class Swarm:
    backend: str
    folder: Any
    model_id: str
    nursery: trio.Nursery
    world: SimWorld | None = None
    servers: list[Peer] = field(default_factory=list)
    clients: list[Peer] = field(default_factory=list)
    bootstrap: list[str] = field(default_factory=list)

    async def _peer(self, *, client_mode: bool) -> Peer:
        box: dict = {}

        async def life(task_status=trio.TASK_STATUS_IGNORED):
            try:
                with trio.CancelScope() as scope:
                    if self.backend == "sim":
                        net = self.world.add_node(place=HERE)
                        await self._run_peer(net, scope, client_mode, box, task_status)
                    else:
                        async with Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]) as net:
                            await self._run_peer(net, scope, client_mode, box, task_status)
            finally:
                if "peer" in box:
                    box["peer"].done.set()

        return await self.nursery.start(life)

    async def _run_peer(self, net, scope, client_mode, box, task_status):
        dht = DHTNode(net, bootstrap=list(self.bootstrap), client_mode=client_mode, config=DHTConfig(**DHT_CFG))
        async with trio.open_nursery() as inner:
            await inner.start(dht.run)
            peer = box["peer"] = Peer(net, dht, scope)
            if not self.bootstrap and not client_mode:
                self.bootstrap.append(net.listen_addrs()[0])
            peer.nursery = inner
            task_status.started(peer)
            await trio.sleep_forever()

    async def add_server(self, start: int | None, end: int | None, **cfg: Any) -> Peer:
        peer = await self._peer(client_mode=False)
        conf = ServerConfig(**{"throughput": FIXED_TP, "announce_period": 5.0, **cfg})
        peer.server = BlockServer(peer.network, peer.dht, self.folder, start, end, config=conf, model_id=self.model_id)
        await peer.nursery.start(peer.server.run)
        self.servers.append(peer)
        return peer

    async def client(self, **cfg: Any) -> DistributedModel:
        peer = await self._peer(client_mode=True)
        self.clients.append(peer)
        return await DistributedModel.from_pretrained(self.folder, peer.network, peer.dht, model_id=self.model_id,
                                                      config=ClientConfig(**cfg))

    async def kill(self, peer: Peer) -> None:
        """Sim: crash (connections cut, no goodbye). libp2p: close that peer's network."""
        peer.alive = False
        if self.backend == "sim":
            self.world.crash(peer.network.peer_id)
        peer.scope.cancel()

    async def stop(self) -> None:
        """Clean shutdown of every peer (servers announce 'offline'), clients first."""
        for peer in self.clients + self.servers:
            peer.scope.cancel()
        with trio.move_on_after(5):
            for peer in self.clients + self.servers:
                await peer.done.wait()

    def server_of(self, peer_id: str) -> Peer:
        return next(p for p in self.servers if p.network.peer_id == peer_id)


@asynccontextmanager
async def swarm(backend: str, folder, spans: list[tuple[int | None, int | None]], *, model_id: str, **server_cfg: Any):
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        world = await stack.enter_async_context(SimWorld.open(seed=0)) if backend == "sim" else None
        s = Swarm(backend, folder, model_id, nursery, world=world)
        for a, b in spans:
            await s.add_server(a, b, **server_cfg)
        try:
            yield s
        finally:
            with trio.CancelScope(shield=True):
                await s.stop()
            nursery.cancel_scope.cancel()


async def stream_with(model: DistributedModel, prompt: list[int], n: int,
                      on_token: Callable[[TokenEvent], Awaitable[None]]) -> tuple[list[int], Generation]:
    """Stream `n` greedy tokens of `prompt`, calling `on_token` after each (to disturb the swarm mid-
    generation); the tokens and the finished `Generation`."""
    tokens: list[int] = []
    async for ev in model.stream(prompt, max_new_tokens=n, stop_token_ids=[]):
        if isinstance(ev, Finished):
            return tokens, ev.generation
        tokens.append(ev.token_id)
        await on_token(ev)
    raise AssertionError("the stream ended without its Finished event")


async def start_dhts(nursery: trio.Nursery, boot_net: Libp2pNetwork, nets: list[Libp2pNetwork]) -> list[DHTNode]:
    """A DHT server on `boot_net` and, bootstrapped from it, a client-mode node on each of `nets` (peers
    that learn each other's addresses only from what they announce), all run in `nursery`; the latter."""
    boot = DHTNode(boot_net, bootstrap=[], config=DHTConfig(**DHT_CFG))
    boot_addr = boot_net.listen_addrs()[0]
    dhts = [DHTNode(net, bootstrap=[boot_addr], client_mode=True, config=DHTConfig(**DHT_CFG)) for net in nets]
    for dht in (boot, *dhts):
        await nursery.start(dht.run)
    return dhts


async def start_block_server(nursery: trio.Nursery, net: Libp2pNetwork, dht: DHTNode, folder, start: int, end: int,
                             model_id: str) -> BlockServer:
    """A BlockServer of blocks [start, end) on `net` at a fixed throughput, run in `nursery`."""
    server = BlockServer(net, dht, folder, start, end, model_id=model_id,
                         config=ServerConfig(throughput=FIXED_TP, announce_period=5.0))
    await nursery.start(server.run)
    return server
