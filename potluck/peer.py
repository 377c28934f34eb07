"""One potluck peer process: the overlay, membership, gossip, and the local control socket.

`run_peer` owns every task of the peer in one nursery, so SIGINT/SIGTERM cancel it and everything
stops together. Each peer gossips a signed presence note (addresses, region) when it starts and
every `presence_interval`, so peers learn of members they are not directly connected to.
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
from pipeline.pricing import ModelPricing

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

    def commands(self) -> dict:
        return {
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
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
                await nursery.start(peer.gossip.run)
                await nursery.start(peer.membership.run)
                await nursery.start(peer.replicator.run)
                await nursery.start(peer.dht.run)
                await nursery.start(control.serve, Path(config.data_dir) / control.SOCKET_NAME, peer.commands())
                nursery.start_soon(peer._presence_loop)
                if on_ready:
                    on_ready(peer)
    finally:
        ledger.store.close()


async def _stop_on_signal(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            cancel_scope.cancel()
            return
