"""One potluck peer process: overlay, membership, gossip, DHT, credits, and — when asked — a block
server and a client for generating through the swarm; plus the local control socket.

`run_peer` owns every task of the peer in one nursery, so SIGINT/SIGTERM cancel it and everything
stops together. Each peer gossips a signed presence note (addresses, region) when it starts and
every `presence_interval`, so peers learn of members they are not directly connected to.

With `--blocks`, the peer serves that span of `--model` (the default model unless named). The
client half (embeddings, final norm, LM head, tokenizer) is loaded on the first generation request,
so volunteers that only serve never pay for it.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import trio

from credits import Ledger
from credits.replication import Replicator
from dht.node import DHTNode
from p2p import framing
from p2p.gossip import Gossip
from p2p.identity import Identity
from p2p.libp2p_net import Libp2pNetwork
from p2p.membership import Membership, check_addr
from p2p.network import Network
from p2p.swarm_key import load_key
from pipeline.client import DistributedModel, Generation
from pipeline.convert import model_folder
from pipeline.pricing import ModelPricing
from pipeline.sampling import SamplingParams
from pipeline.server import BlockServer, ServerConfig, parse_blocks

from . import control

log = logging.getLogger(__name__)

PRESENCE_TOPIC = "presence"


@dataclass
class PeerConfig:
    data_dir: Path
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    swarm_key_file: Path | None = None
    region: str = ""
    presence_interval: float = 30.0
    model: str | None = None  # None: the default model
    blocks: str | None = None  # "a:b" or "auto": serve blocks; None: serve none
    dtype: str = "float32"


class Peer:
    """The parts of a running peer, wired together; `run_peer` drives it."""

    def __init__(self, config: PeerConfig, identity: Identity, network: Network, ledger: Ledger):
        self.config = config
        self.identity = identity
        self.network = network
        self.ledger = ledger
        self.membership = Membership(network, region=config.region)
        self.dht = DHTNode(network, bootstrap=config.bootstrap, region=config.region or None)
        self.gossip = Gossip(network, identity)
        self.replicator = Replicator(ledger, network, self.gossip)
        self.gossip.subscribe(PRESENCE_TOPIC, self._on_presence, validator=self._valid_presence)
        self.presence_seen: set[str] = set()
        self.server: BlockServer | None = None
        self._client: DistributedModel | None = None
        self._client_lock = trio.Lock()
        self.last_generation: dict | None = None

    def _valid_presence(self, message) -> bool:
        body = framing.expect_map(message.data, "presence")
        addrs = framing.field(body, "addrs", list, max_len=8)
        framing.field(body, "region", str, max_len=64)
        for addr in addrs:
            check_addr(addr, message.author)
        return True

    def _on_presence(self, message) -> None:
        self.presence_seen.add(message.author)
        addrs = message.data["addrs"]
        if message.author != self.identity.peer_id and addrs:
            self.membership.learn(message.author, addrs[0], message.data["region"])

    async def announce_presence(self) -> None:
        await self.gossip.publish(
            PRESENCE_TOPIC, {"addrs": self.network.listen_addrs(), "region": self.config.region}
        )

    def status(self) -> dict:
        return {
            "peer_id": self.identity.peer_id,
            "addrs": self.network.listen_addrs(),
            "region": self.config.region,
            "private_swarm": self.config.swarm_key_file is not None,
            "peers": [p.as_dict() for p in self.membership.peers()],
            "connected": sorted(self.network.connected_peers()),
            "presence_seen": sorted(self.presence_seen),
            "gossip": asdict(self.gossip.stats),
            "dht": self.dht.status(),
            "server": self.server.status() if self.server else None,
            "last_generation": self.last_generation,
        }

    async def _status_command(self, request: dict) -> dict:
        return self.status()

    async def _credits_command(self, request: dict) -> dict:
        return self.ledger.summary(await self.ledger.balances())

    # DHT operations for operators and tests, through the control socket.
    async def _dht_store_command(self, request: dict) -> dict:
        key = framing.field(request, "key", str, max_len=256)
        ttl = framing.field(request, "ttl", (int, float))
        return {"stored_at": await self.dht.store(key, request.get("value"), ttl=ttl)}

    async def _dht_get_command(self, request: dict) -> dict:
        entries = await self.dht.get(framing.field(request, "key", str, max_len=256))
        return {subkey: {"value": e.value, "expires": e.expires} for subkey, e in entries.items()}

    async def _dht_find_peer_command(self, request: dict) -> dict:
        return {"addr": await self.dht.find_peer(framing.field(request, "peer_id", str, max_len=64))}

    # --- generating through the swarm ----------------------------------------------------------------

    async def client(self) -> DistributedModel:
        """The client half of the model, loaded on first use."""
        async with self._client_lock:
            if self._client is None:
                folder = await trio.to_thread.run_sync(model_folder, self.config.model, self.config.data_dir)
                self._client = await DistributedModel.from_pretrained(folder, self.network, self.dht,
                                                                      dtype=self.config.dtype)
            return self._client

    async def generate(self, prompt: str | list[dict], params: SamplingParams) -> Generation:
        client = await self.client()
        result = await client.generate(prompt, params)
        self.last_generation = _generation_summary(result)
        return result

    async def _generate_command(self, request: dict) -> dict:
        prompt = request.get("messages") or framing.field(request, "prompt", str, max_len=1 << 20)
        params = SamplingParams(
            max_new_tokens=framing.field(request, "max_tokens", int, optional=True) or 64,
            temperature=float(framing.field(request, "temperature", (int, float), optional=True) or 0.0),
            seed=framing.field(request, "seed", int, optional=True),
        )
        result = await self.generate(prompt, params)
        return {"text": result.text, "token_ids": result.token_ids, **self.last_generation}

    def commands(self) -> dict:
        return {
            "generate": self._generate_command,
            "status": self._status_command,
            "credits": self._credits_command,
            "dht_store": self._dht_store_command,
            "dht_get": self._dht_get_command,
            "dht_find_peer": self._dht_find_peer_command,
        }

    async def _presence_loop(self) -> None:
        while True:
            await self.announce_presence()
            await trio.sleep(self.config.presence_interval)


async def run_peer(config: PeerConfig, on_ready: Callable[[Peer], None] | None = None) -> None:
    """Run a peer until cancelled or until SIGINT/SIGTERM arrives."""
    identity = Identity.load_or_create(config.data_dir)
    swarm_key = load_key(config.swarm_key_file) if config.swarm_key_file else None
    ledger = Ledger.open(identity, config.data_dir, pricing=ModelPricing())
    try:
        async with Libp2pNetwork.open(identity, config.listen, swarm_key=swarm_key) as network:
            peer = Peer(config, identity, network, ledger)
            if config.bootstrap:
                # Before any task starts, so a refused swarm key ends the peer with a plain error.
                await peer.membership.bootstrap(config.bootstrap)
            await ledger.claim_starting_grant()
            if config.blocks is not None:
                folder = await trio.to_thread.run_sync(model_folder, config.model, config.data_dir)
                start, end = parse_blocks(config.blocks)
                peer.server = BlockServer(network, peer.dht, folder, start, end,
                                          config=ServerConfig(dtype=config.dtype))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                await nursery.start(peer.gossip.run)
                await nursery.start(peer.membership.run)
                await nursery.start(peer.replicator.run)
                await nursery.start(peer.dht.run)
                if peer.server is not None:
                    await nursery.start(peer.server.run)
                await nursery.start(control.serve, Path(config.data_dir) / control.SOCKET_NAME, peer.commands())
                nursery.start_soon(peer._presence_loop)
                if on_ready:
                    on_ready(peer)
    finally:
        ledger.store.close()


def _generation_summary(result: Generation) -> dict:
    """What a person wants to know about a generation: which peers served which blocks, and how fast."""
    stats = result.stats
    return {
        "route": [{"peer_id": peer_id, "start": start, "end": end} for peer_id, start, end in stats.get("route", [])],
        "tokens": len(result.token_ids),
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "ttft_s": stats.get("ttft_s"),
        "wall_s": stats.get("wall_s"),
        "tokens_per_s": stats.get("tokens_per_s"),
        "recoveries": stats.get("recoveries", 0),
    }


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return
