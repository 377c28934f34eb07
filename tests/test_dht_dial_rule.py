"""No dialling where strangers say (issue #13), in the DHT: an address a stranger gives — a contact in a
FIND_NODE/FIND_VALUE reply, the sender address of a request or a reply — passes `Network.may_dial` before
the node dials it, notes it in the address book, or lets it into a table or a walk. One that may not be
dialled (this host, its link, a private network we are not in, an address naming no IP) is dropped and
counted; the rest of the message is used. The operator's bootstrap addresses are dialled as given."""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import pytest
import trio

from dht import protocol as proto
from dht.ids import key_id
from dht.node import DHTConfig, DHTNode
from dht.vivaldi import Coord
from p2p.errors import PeerUnreachable
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.addresses import DialVerdicts, may_dial_addr
from p2p.sim import SimWorld
from testkit.swarms import DHT_CFG

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PUBLIC_IP = "203.0.113.9"  # what a peer with a public address counts as its own


def forbidden_addrs(peer_id: str, relay_id: str) -> list[str]:
    """Addresses of `peer_id` no peer may be made to dial, whether it lives on loopback or on a public IP."""
    return [f"/ip4/10.0.0.1/tcp/4001/p2p/{peer_id}",  # a private network
            f"/ip4/192.168.1.5/tcp/22/p2p/{peer_id}",
            f"/ip4/169.254.169.254/tcp/80/p2p/{peer_id}",  # link-local: cloud metadata
            f"/ip4/0.0.0.0/tcp/8000/p2p/{peer_id}",  # this host
            f"/ip6/fe80::1/tcp/4001/p2p/{peer_id}",
            f"/dns4/localhost/tcp/4001/p2p/{peer_id}",  # no IP to judge
            f"/ip4/10.9.9.9/tcp/4001/p2p/{relay_id}/p2p-circuit/p2p/{peer_id}"]  # a relay in a private network


def info(addr: str | None) -> dict:
    return proto.encode_info(Coord(), [], addr)


# --- the ingest seam: what one message may add ----------------------------------------------------------


@pytest.fixture
def public_node(monkeypatch) -> DHTNode:
    """A DHT node whose network judges addresses as a peer at a public IP does (the simulator's own
    rule allows every address)."""
    net = SimWorld().add_node()
    monkeypatch.setattr(net, "may_dial", partial(may_dial_addr, ours=[PUBLIC_IP]))
    return DHTNode(net, config=DHTConfig(**DHT_CFG))


def in_tables(node: DHTNode, peer_id: str) -> bool:
    return any(c.peer_id == peer_id for table in node.tables.values() for c in table.contacts())


async def test_a_request_whose_sender_address_may_not_be_dialled_is_answered_and_its_address_dropped(public_node):
    node, relay = public_node, Identity.generate().peer_id
    senders = [Identity.generate().peer_id for _ in range(len(forbidden_addrs("", "")) + 1)]
    claims = [*(forbidden_addrs(pid, relay)[i] for i, pid in enumerate(senders[:-1])),
              f"/ip4/127.0.0.1/tcp/4001/p2p/{senders[-1]}"]  # a public peer never dials this host either
    for i, (sender, addr) in enumerate(zip(senders, claims)):
        assert not node.network.may_dial(addr), addr
        reply = await node._handle(sender, {"op": "ping", "i": info(addr)})
        assert "i" in reply  # answered as any request
        assert node.peers[sender].addr is None and node.network.address_of(sender) is None
        assert not in_tables(node, sender)
        assert node.stats["addrs_refused"] == i + 1
    sender = Identity.generate().peer_id
    public = f"/ip4/198.51.100.7/tcp/4001/p2p/{sender}"
    await node._handle(sender, {"op": "ping", "i": info(public)})
    assert node.peers[sender].addr == public and node.network.address_of(sender) == public
    assert in_tables(node, sender) and node.stats["addrs_refused"] == len(forbidden_addrs("", "")) + 1


async def test_a_reply_keeps_only_the_contacts_we_may_dial(public_node):
    node, responder = public_node, Identity.generate().peer_id
    honest = [Identity.generate().peer_id for _ in range(3)]
    liars = [Identity.generate().peer_id for _ in range(7)]
    relay = Identity.generate().peer_id
    contacts = [proto.encode_contact(pid, f"/ip4/198.51.100.{i + 1}/tcp/4001/p2p/{pid}", None)
                for i, pid in enumerate(honest)]
    contacts += [proto.encode_contact(pid, forbidden_addrs(pid, relay)[i], Coord()) for i, pid in enumerate(liars)]
    reply = proto.decode_reply("find_node", responder, {"i": info(None), "n": contacts})
    assert len(reply.contacts) == len(honest) + len(liars)  # well-formed: the decoder keeps them all
    kept = node._contacts(reply.contacts)
    assert [c.peer_id for c, _ in kept] == honest
    assert node.stats["addrs_refused"] == len(liars)
    assert all(node.network.address_of(pid) is None for pid in liars)


async def test_a_bootstrap_peer_whose_own_address_may_not_be_dialled_stands_at_the_operators_address(monkeypatch):
    """Every simulator address names no IP, so a public peer's rule refuses all: the peer the operator
    named is kept at the address the operator gave, what it tells of others is dropped."""
    async with SimWorld.open(seed=3) as world, trio.open_nursery() as nursery:
        boot = DHTNode(world.add_node(), config=DHTConfig(**DHT_CFG))
        await nursery.start(boot.run)
        other = DHTNode(world.add_node(), bootstrap=[boot.addr], config=DHTConfig(**DHT_CFG))
        await nursery.start(other.run)
        assert other.ready.is_set()
        net = world.add_node()
        monkeypatch.setattr(net, "may_dial", partial(may_dial_addr, ours=[PUBLIC_IP]))
        node = DHTNode(net, bootstrap=[boot.addr], config=DHTConfig(**DHT_CFG))
        await nursery.start(node.run)
        assert node.ready.is_set()
        assert [c.peer_id for c in node.tables[0].contacts()] == [boot.peer_id]
        assert node.peers[boot.peer_id].addr == boot.addr
        assert net.address_of(other.peer_id) is None and node.stats["addrs_refused"] >= 2  # boot's own, other's
        nursery.cancel_scope.cancel()


# --- the rule's verdicts, remembered ---------------------------------------------------------------------


async def test_the_dial_rules_remembered_verdicts_follow_the_ips_we_are_seen_at(monkeypatch):
    async with Libp2pNetwork.open(Identity.generate(), LOOPBACK) as net:
        pid = Identity.generate().peer_id
        lan, here = f"/ip4/10.0.0.1/tcp/4001/p2p/{pid}", f"/ip4/127.0.0.1/tcp/4001/p2p/{pid}"
        assert net.may_dial(here) and not net.may_dial(lan)  # a swarm on one machine
        monkeypatch.setattr(net, "confirmed_ips", lambda: ["10.0.0.9"])  # peers see us in a private network
        assert net.may_dial(lan) and not net.may_dial(here)
        monkeypatch.setattr(net, "confirmed_ips", lambda: [PUBLIC_IP])
        assert not net.may_dial(lan) and not net.may_dial(here)


def test_the_remembered_verdicts_are_bounded():
    verdicts = DialVerdicts(max_addrs=8)
    pids = [Identity.generate().peer_id for _ in range(20)]
    for i, pid in enumerate(pids):
        assert verdicts.may_dial(f"/ip4/198.51.100.{i + 1}/tcp/4001/p2p/{pid}", [PUBLIC_IP])
        assert not verdicts.may_dial(f"/ip4/10.0.0.{i + 1}/tcp/4001/p2p/{pid}", [PUBLIC_IP])
        assert len(verdicts._verdicts) <= 8


# --- real peers on loopback ------------------------------------------------------------------------------


class HostileDHT:
    """A peer that answers the DHT protocol with the honest contacts it knows plus fakes at addresses
    nobody may dial, and names itself at its true address (so honest tables hold it)."""

    def __init__(self, net: Libp2pNetwork, honest: list[DHTNode]):
        self.net = net
        self.honest = honest
        relay = Identity.generate().peer_id
        fakes = [Identity.generate().peer_id for _ in forbidden_addrs("", "")]
        self.fakes = {pid: forbidden_addrs(pid, relay)[i] for i, pid in enumerate(fakes)}  # one of each kind
        self.lookups_answered = 0
        net.set_request_handler(proto.PROTOCOL, self.handle)

    def info(self) -> dict:
        return info(self.net.listen_addrs()[0])

    async def handle(self, sender: str, body: Any) -> dict:
        op = body.get("op") if isinstance(body, dict) else None
        if op in ("find_node", "find_value"):
            self.lookups_answered += 1
            contacts = [proto.encode_contact(pid, addr, None) for pid, addr in self.fakes.items()]
            contacts += [proto.encode_contact(n.peer_id, n.addr, None) for n in self.honest
                         if n.peer_id != sender and n.addr is not None]
            return {"i": self.info(), "n": contacts, **({"e": []} if op == "find_value" else {})}
        if op == "store":
            return {"i": self.info(), "ok": [False] * len(body.get("e", []))}
        return {"i": self.info()}

    async def ping(self, peer_id: str, addr: str, *, claim: str) -> None:
        """Send `peer_id` a ping whose sender address is `claim`."""
        await self.net.connect(addr)
        await self.net.request(peer_id, proto.PROTOCOL, {"op": "ping", "i": info(claim)})


def record_dials(net: Libp2pNetwork, monkeypatch) -> tuple[list[str], list[str]]:
    """Every address `net` is asked to dial and to note. A dial off loopback is refused here, before
    any packet leaves (so this test sends none even when the rule under test is switched off)."""
    dialled: list[str] = []
    noted: list[str] = []
    connect, add_address = net.connect, net.add_address

    async def recording_connect(addr: str, timeout: float = 5.0) -> str:
        dialled.append(addr)
        if not addr.startswith("/ip4/127."):
            raise PeerUnreachable(f"this test dials loopback only, not {addr}")
        return await connect(addr, timeout)

    def recording_add_address(peer_id: str, addr: str) -> None:
        noted.append(addr)
        add_address(peer_id, addr)

    monkeypatch.setattr(net, "connect", recording_connect)
    monkeypatch.setattr(net, "add_address", recording_add_address)
    return dialled, noted


async def test_a_hostile_dht_peer_cannot_aim_an_honest_peers_dials_and_lookups_still_succeed(monkeypatch):
    key = "greeting/hello"
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            nets = [await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK))
                    for _ in range(5)]
            boot_net, owner_net, hostile_net, liar_net, my_net = nets
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            boot = DHTNode(boot_net, config=DHTConfig(**DHT_CFG))
            await nursery.start(boot.run)
            owner = DHTNode(owner_net, bootstrap=[boot.addr], config=DHTConfig(**DHT_CFG))
            await nursery.start(owner.run)
            hostile = HostileDHT(hostile_net, [boot, owner])
            await hostile.ping(boot.peer_id, boot.addr, claim=hostile_net.listen_addrs()[0])
            assert any(c.peer_id == hostile_net.peer_id for c in boot.tables[0].contacts())
            assert await owner.store(key, {"text": "hi"}, ttl=120) >= 1

            dialled, noted = record_dials(my_net, monkeypatch)
            me = DHTNode(my_net, bootstrap=[boot.addr], config=DHTConfig(**DHT_CFG))
            await nursery.start(me.run)
            assert me.ready.is_set()
            got = await me.get(key, quorum=2)
            assert got[owner.peer_id].value == {"text": "hi"}  # found through the honest contacts
            closest = await me.find_closest(key_id(key))
            assert {c.peer_id for c in closest} == {boot.peer_id, owner.peer_id, hostile_net.peer_id}

            # a request whose sender names an address we may not dial
            claim = forbidden_addrs(liar_net.peer_id, hostile_net.peer_id)[0]
            liar = HostileDHT(liar_net, [])
            await liar.ping(me.peer_id, my_net.listen_addrs()[0], claim=claim)

            assert hostile.lookups_answered >= 1  # the fakes were offered
            forbidden = {*hostile.fakes.values(), claim}
            assert not forbidden & {*dialled, *noted}
            assert all(my_net.address_of(pid) is None for pid in [*hostile.fakes, liar_net.peer_id])
            assert not any(in_tables(me, pid) for pid in [*hostile.fakes, liar_net.peer_id])
            assert me.stats["addrs_refused"] >= len(hostile.fakes) + 1
            assert me.status()["addrs_refused"] == me.stats["addrs_refused"]
