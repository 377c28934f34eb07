"""`potluck serve`'s limit flags reach the layers they bound: the flags → PeerLimits mapping, a peer
built with those limits (its DHT store refuses past the flag's size), and one real peer process that
closes a second unadmitted connection from one IP at `--max-inbound-per-ip 1`."""

from __future__ import annotations

import socket
import time

import pytest

from credits import Ledger
from dht.records import SignedValue, StoreRefused
from p2p.gossip import GossipQuotas
from p2p.identity import Identity
from p2p.libp2p import InboundLimits, pace
from p2p.sim import SimWorld
from pipeline.pricing import ModelPricing
from potluck.cli import build_parser, peer_limits
from potluck.peer import Peer, PeerConfig, PeerLimits

MIB = 1 << 20


def limits_of(*flags: str) -> PeerLimits:
    return peer_limits(build_parser().parse_args(["serve", *flags]))


def test_no_flags_keep_every_layers_defaults():
    assert limits_of() == PeerLimits()
    assert limits_of().network_options() == {"inbound_limits": InboundLimits()}


def test_each_flag_sets_its_layers_limit_and_nothing_else():
    limits = limits_of("--max-inbound-per-ip", "3", "--inflight-mb", "20", "--dht-store-mb", "0.5",
                       "--gossip-rate", "0.25", "--gossip-mb", "4", "--request-rate", "30")
    assert limits.inbound == InboundLimits(max_unadmitted_per_ip=3)
    assert limits.inflight_bytes_in == 20 * MIB
    assert limits.dht_store.max_bytes == MIB // 2 and limits.dht_store.max_values == PeerLimits().dht_store.max_values
    assert limits.gossip == GossipQuotas(rate=0.25, max_total_bytes=4 * MIB)
    assert limits.network_options() == {"inbound_limits": InboundLimits(max_unadmitted_per_ip=3),
                                        "max_inflight_bytes_in": 20 * MIB, "request_rate": 30, "request_burst": 60}


@pytest.mark.parametrize("flags", [("--max-inbound-per-ip", "0"), ("--dht-store-mb", "-1"), ("--gossip-rate", "0"),
                                   ("--gossip-mb", "0"), ("--inflight-mb", "15"),
                                   ("--request-rate", "0")])
def test_out_of_range_flags_are_refused(flags):
    with pytest.raises(ValueError):
        limits_of(*flags)


def test_the_help_states_each_layers_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    raw = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    assert max(len(line) for line in raw.splitlines()) <= 80
    text = " ".join(raw.split())
    defaults = PeerLimits()
    assert f"(default {defaults.inbound.max_unadmitted_per_ip})" in text
    assert f"(default {defaults.dht_store.max_bytes // MIB})" in text
    assert f"(default {pace.DEFAULT_RATE:g})" in text
    assert f"(default {defaults.gossip.rate:g})" in text and f"burst of {defaults.gossip.burst}" in text
    assert f"(default {defaults.gossip.max_total_bytes // MIB})" in text


async def test_a_peer_started_with_a_small_dht_store_refuses_the_next_store(tmp_path):
    async with SimWorld.open() as world:
        identity = Identity.generate()
        network = world.add_node(identity)
        config = PeerConfig(data_dir=tmp_path, limits=limits_of("--dht-store-mb", "0.01", "--gossip-rate", "0.5"))
        peer = Peer(config, identity, network, Ledger.open(identity, None, pricing=ModelPricing()))
        assert peer.gossip.quotas.rate == 0.5
        owners = [Identity.generate() for _ in range(3)]
        now = world.nodes[0].now()
        entries = [SignedValue.create(o, f"k/{i}", b"x" * 4000, now + 600) for i, o in enumerate(owners)]
        assert peer.dht.records.put(entries[0], now, sender=owners[0].peer_id)
        assert peer.dht.records.put(entries[1], now, sender=owners[1].peer_id)
        with pytest.raises(StoreRefused):  # 10 KiB hold two 4 kB values, not three
            peer.dht.records.put(entries[2], now, sender=owners[2].peer_id)


def _connect_idle(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    sock.settimeout(30)  # a bound for the test, not a figure it checks
    return sock


@pytest.mark.slow  # a real peer process
def test_max_inbound_per_ip_reaches_the_network(spawn):
    peer = spawn("--max-inbound-per-ip", "1")
    port = int(peer.addr.split("/tcp/")[1].split("/")[0])
    first = _connect_idle(port, "127.0.0.9")
    with first:
        assert first.recv(100)  # taken: the peer starts its upgrade (multistream-select) and waits for us
        time.sleep(0.2)  # (the upgrade deadline is 5 s: the first is still unadmitted when the second comes)
        with _connect_idle(port, "127.0.0.9") as second:
            assert second.recv(100) == b""  # refused: closed before a byte of the upgrade
        with _connect_idle(port, "127.0.0.10") as other_ip:
            assert other_ip.recv(100)  # another address has its own allowance
