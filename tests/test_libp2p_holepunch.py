"""Hole punching (p2p.libp2p.holepunch, DCUtR) between Libp2pNetworks on 127.0.0.1: the exchange over a
circuit, the move of the peers' sessions to the direct connection with a request in flight, and
hostile DCUtR input. On loopback every dial gets through; NATs (and who stays relayed) are
tests/test_netns_holepunch.py."""

from __future__ import annotations

from contextlib import AsyncExitStack

import multiaddr
import trio
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from libp2p.utils.varint import encode_uvarint, read_varint_prefixed_bytes_limited

from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from p2p.libp2p.addresses import may_dial
from p2p.libp2p.holepunch import DCUTR_PROTOCOL, MAX_ADDRS, decode_addrs
from p2p.libp2p.holepunch import HolePunch as HolePunchExchange

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
SLOW = "/potluck/slow/1.0.0"


async def _until(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_relayed_peers_move_to_a_direct_connection_and_a_request_in_flight_finishes():
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, relay_service=True))
        nated = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[relay.listen_addrs()[0]]))
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK))

        async def slow(peer_id, body):
            # Answers only once the direct connection is up: the request spans the move.
            await _until(lambda: "direct" in nated.connection_kinds(peer_id))
            return body

        async def echo(peer_id, body):
            return body

        nated.set_request_handler(SLOW, slow)
        dialer.set_request_handler(SLOW, echo)
        peer = await dialer.connect(nated.listen_addrs()[0])
        assert dialer.connection_kinds(peer) == ["relayed"] and not dialer.is_direct(peer)
        assert await dialer.request(peer, SLOW, "spans the move", timeout=15) == "spans the move"
        # Both sides' sessions run on the direct connection; the relayed one is closed, at the relay too.
        await _until(lambda: dialer.connection_kinds(peer) == ["direct"] and dialer.is_direct(peer))
        await _until(lambda: nated.connection_kinds(dialer.peer_id) == ["direct"] and nated.is_direct(dialer.peer_id))
        await _until(lambda: relay.relay_status()["circuits_active"] == 0)
        assert relay.relay_status()["circuits_opened"] == 1
        assert nated.relay_status()["hole_punch"] == {"attempts": 1, "direct": 1, "failed": 0}
        assert dialer.relay_status()["hole_punch"] == {"attempts": 1, "direct": 1, "failed": 0}
        assert await nated.request(dialer.peer_id, SLOW, "back", timeout=5) == "back"
        assert dialer.connected_peers().count(peer) == 1


async def _echo(peer_id, body):
    return body


async def test_private_swarm_members_met_over_a_relay_move_to_a_direct_connection():
    """Members learn where they are seen from the gate handshake (they run no identify) and punch with it."""
    key = b"k" * 32
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relay_service=True))
        nated = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relays=[relay.listen_addrs()[0]]))
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key))
        dialer.set_request_handler(SLOW, _echo)
        peer = await dialer.connect(nated.listen_addrs()[0])
        assert dialer.connection_kinds(peer) == ["relayed"]
        # where the relay sees each: the port each dialled it from
        for net in (nated, dialer):
            port = relay._session(net.peer_id).raw.get_remote_address()[1]
            assert net.observed_addrs() == [(f"/ip4/127.0.0.1/tcp/{port}", 1)]
            assert net.identified(relay.peer_id) is None
        await _until(lambda: dialer.connection_kinds(peer) == ["direct"] and dialer.is_direct(peer))
        await _until(lambda: nated.connection_kinds(dialer.peer_id) == ["direct"] and nated.is_direct(dialer.peer_id))
        assert nated.relay_status()["hole_punch"] == {"attempts": 1, "direct": 1, "failed": 0}
        assert await nated.request(dialer.peer_id, SLOW, "direct", timeout=5) == "direct"


async def test_a_relayed_member_cannot_tell_us_where_we_are_seen():
    """Over a relay the far end of the socket is the relay: what a member says there is not kept."""
    key = b"k" * 32
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key, relay_service=True))
        nated = await stack.enter_async_context(Libp2pNetwork.open(
            Identity.generate(), LOOPBACK, swarm_key=key, relays=[relay.listen_addrs()[0]], hole_punch=False))
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, swarm_key=key))
        nated._far_end = lambda raw: "/ip4/127.0.0.1/tcp/1"  # type: ignore[method-assign]  # says it anyway
        await dialer.connect(relay.listen_addrs()[0])
        seen_by_relay = dialer.observed_addrs()
        await dialer.connect(nated.listen_addrs()[0])
        assert dialer.connection_kinds(nated.peer_id) == ["relayed"]
        assert dialer.observed_addrs() == seen_by_relay != [("/ip4/127.0.0.1/tcp/1", 1)]


async def test_dcutr_is_served_only_over_a_relay_and_bounded():
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, relay_service=True))
        # This peer starts no exchange itself: the test speaks DCUtR for it.
        nated = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[relay.listen_addrs()[0]], hole_punch=False))
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK))

        async def reset_without_answer(net, peer_id, data):
            answer = b""
            with trio.fail_after(5):
                try:
                    stream = await net.host.new_stream(ID.from_base58(peer_id), [DCUTR_PROTOCOL])
                    await stream.write(data)
                    answer = await stream.read(1)
                except Exception:
                    pass  # reset (even before the protocol negotiation finished): what we expect
            assert answer == b""

        # Over a direct connection (to the relay, admitted): refused.
        await dialer.connect(relay.listen_addrs()[0])
        await reset_without_answer(dialer, relay.peer_id, encode_uvarint(2) + b"\x08\x64")
        assert relay.relay_status()["hole_punch"]["attempts"] == 0
        # Over the circuit, a CONNECT claiming 1 MiB is refused before anything is read.
        await dialer.connect(nated.listen_addrs()[0])
        await reset_without_answer(nated, dialer.peer_id, encode_uvarint(1 << 20) + b"x" * 100)
        await _until(lambda: dialer.relay_status()["hole_punch"]["failed"] == 1)
        assert dialer.connection_kinds(nated.peer_id) == ["relayed"]


async def test_a_stranger_cannot_aim_our_punches_at_this_host_its_link_or_private_networks():
    async with AsyncExitStack() as stack:
        relay = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK, relay_service=True))
        # The test speaks DCUtR for this peer (B), naming the addresses the dialer (A) will punch.
        nated = await stack.enter_async_context(
            Libp2pNetwork.open(Identity.generate(), LOOPBACK, relays=[relay.listen_addrs()[0]], hole_punch=False))
        dialer = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), LOOPBACK))
        dialled = []
        swarm = dialer._swarm
        real_dial = swarm._dial_addr_single_attempt

        async def recording_dial(addr, peer_id, source=None):
            dialled.append(str(addr))
            return await real_dial(addr, peer_id, source)

        await dialer.connect(nated.listen_addrs()[0])  # through the relay: dialer reaches it first
        swarm._dial_addr_single_attempt = recording_dial
        hostile = ["/ip4/169.254.169.254/tcp/80", "/ip4/10.0.0.1/tcp/22", "/ip4/192.168.1.1/tcp/80",
                   "/ip4/100.64.0.1/tcp/80", "/ip4/0.0.0.0/tcp/80", "/ip6/::/tcp/80", "/ip6/fe80::1/tcp/80",
                   "/ip4/224.0.0.1/tcp/80"]
        with trio.fail_after(10):
            stream = await nated.host.new_stream(ID.from_base58(dialer.peer_id), [DCUTR_PROTOCOL])
            await write_delimited_msg(stream, HolePunch(
                type=HolePunch.CONNECT, ObsAddrs=[multiaddr.Multiaddr(a).to_bytes() for a in hostile]))
            answer = HolePunch()
            answer.ParseFromString(await read_varint_prefixed_bytes_limited(stream, 4096))
            assert answer.type == HolePunch.CONNECT
            await write_delimited_msg(stream, HolePunch(type=HolePunch.SYNC))
        await _until(lambda: dialer.relay_status()["hole_punch"]["failed"] == 1)
        assert dialled == [] and dialer.connection_kinds(nated.peer_id) == ["relayed"]


def test_punch_targets_follow_the_ip_class_of_our_own_addresses():
    loopback_only, lan, public = ["127.0.0.1"], ["10.77.1.2", "203.0.113.9"], ["203.0.113.9"]
    for ip in ("0.0.0.0", "::", "0:0::0", "169.254.169.254", "fe80::1", "224.0.0.1", "0.1.2.3", "240.0.0.1"):
        assert not may_dial(ip, loopback_only) and not may_dial(ip, lan) and not may_dial(ip, public)
    assert may_dial("127.0.0.1", loopback_only) and not may_dial("127.0.0.1", lan)
    assert not may_dial("::ffff:127.0.0.1", public) and not may_dial("::1", ["127.0.0.1", "203.0.113.9"])
    for ip in ("10.0.0.1", "172.16.5.5", "192.168.1.1", "100.64.0.1", "fd00::1"):
        assert may_dial(ip, lan) and not may_dial(ip, public) and not may_dial(ip, loopback_only)
    assert may_dial("198.51.100.4", public) and may_dial("198.51.100.4", lan) and not may_dial("not an ip", public)


def test_connect_addresses_are_bounded_and_checked():
    good = [multiaddr.Multiaddr(f"/ip4/10.0.0.{i}/tcp/4001").to_bytes() for i in range(1, 40)]
    circuit = multiaddr.Multiaddr(
        "/ip4/10.0.0.1/tcp/1/p2p/12D3KooWJ4sZ2MBHhKprbKhHuAweyNCC4p4KQoqEb2AoRBzWHzbm/p2p-circuit").to_bytes()
    udp = multiaddr.Multiaddr("/ip4/10.0.0.1/udp/4001").to_bytes()
    assert decode_addrs([b"\xff\xff garbage", circuit, udp, good[0], good[0]]) == [("10.0.0.1", 4001)]
    assert len(decode_addrs(good)) == MAX_ADDRS


class _Observed:
    """What `HolePunch._our_addrs` reads of a network: where we listen and where peers see us."""

    def __init__(self, observed, confirmed):
        self.observed, self.confirmed = observed, confirmed

    def direct_addrs(self):
        return ["/ip4/10.0.0.5/tcp/4001/p2p/12D3KooWJ4sZ2MBHhKprbKhHuAweyNCC4p4KQoqEb2AoRBzWHzbm"]

    def observed_addrs(self):
        return self.observed

    def confirmed_ips(self):
        return self.confirmed


async def test_we_announce_confirmed_ips_and_the_top_observation_only_while_none_is_confirmed():
    def announced(observed, confirmed):
        return HolePunchExchange(_Observed(observed, confirmed), None, enabled=False)._our_addrs()

    # A single network's reporters (a Sybil /24) name 6.6.6.6; two networks confirm 198.51.100.4.
    observed = [("/ip4/6.6.6.6/tcp/1111", 1), ("/ip4/198.51.100.4/tcp/2222", 1), ("/ip4/6.6.6.7/tcp/3", 1)]
    assert await announced(observed, ["198.51.100.4"]) == [multiaddr.Multiaddr("/ip4/198.51.100.4/tcp/4001").to_bytes()]
    assert await announced(observed, []) == [multiaddr.Multiaddr("/ip4/6.6.6.6/tcp/4001").to_bytes()]
