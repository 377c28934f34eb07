"""The network lab itself: delays between regions, loss, partitions, NAT, and teardown.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh installs the tools);
skips with the reason otherwise."""

import os
import subprocess
import time

import pytest

from netlab import Lab, skip_reason
from netlab.topology import PREFIX

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]


@pytest.fixture(scope="module")
def lab():
    with Lab(regions={"eu": 2, "us": 1, "ap": 1}, nats={"home": ("eu", 2)}) as lab:
        yield lab


def test_tcp_rtt_matches_the_configured_delays(lab):
    eu0, eu1, us0, ap0 = (lab.host(n) for n in ("eu-0", "eu-1", "us-0", "ap-0"))
    for a, b in [(eu0, eu1), (eu0, us0), (eu0, ap0), (us0, ap0)]:
        want = lab.expected_rtt_ms(a, b)
        got = lab.tcp_rtt(a, b, count=20)
        assert got["failures"] == 0
        # The router adds ≈0.1 ms per hop (see bench.netns); Python client/server add a little more.
        assert want - 0.5 <= got["min_ms"] <= want + 3, (a.name, b.name, want, got)
        assert got["median_ms"] <= want + 10, (a.name, b.name, want, got)
        # A TCP handshake is one RTT.
        assert want - 0.5 <= got["connect_ms"] <= want + 25, (a.name, b.name, want, got)
    stats = lab.router_stats()
    assert stats["sent"] > 0 and stats["dropped_queue"] == 0
    assert stats["lateness_us"]["p50"] < 2000, stats


def test_jitter_never_reorders_a_flow():
    with Lab(regions={"a": 1, "b": 1}, rtt_ms={("a", "b"): 40}, jitter_ms=20, seed=7) as lab:
        a, b = lab.host("a-0"), lab.host("b-0")
        got = lab.tcp_rtt(a, b, count=40, interval=0.01)
        assert got["failures"] == 0
        # jitter_ms is ± on the RTT (± half of it on each direction): RTTs lie in [20, 60] ms.
        assert 20 - 0.5 <= got["min_ms"] and got["p90_ms"] <= 60 + 10, got
        assert max(got["rtts_ms"]) - min(got["rtts_ms"]) > 3, "jitter should spread the RTTs"
        # 200 datagrams 2 ms apart with ±10 ms jitter each way: all arrive (the order is kept per flow).
        assert lab.udp_delivery(a, b, count=200)["delivery"] == 1.0


def test_rtt_can_change_while_running(lab):
    eu0, us0 = lab.host("eu-0"), lab.host("us-0")
    lab.set_rtt("eu", "us", 30)
    try:
        time.sleep(0.2)
        got = lab.tcp_rtt(eu0, us0, count=10)
        assert 29.5 <= got["min_ms"] <= 33, got
    finally:
        lab.set_rtt("eu", "us", 80)


def test_random_loss_on_one_link(lab):
    eu0, us0 = lab.host("eu-0"), lab.host("us-0")
    assert lab.udp_delivery(eu0, us0, count=300)["delivery"] >= 0.99
    lab.set_loss(us0, 0.3)
    try:
        # 30 % each way: (0.7)^2 = 49 % of round trips survive.
        got = lab.udp_delivery(eu0, us0, count=400)
        assert 0.36 <= got["delivery"] <= 0.62, got
        # Other links are untouched.
        assert lab.udp_delivery(eu0, lab.host("ap-0"), count=200)["delivery"] >= 0.99
    finally:
        lab.clear_loss(us0)
    assert lab.udp_delivery(eu0, us0, count=300)["delivery"] >= 0.99


def test_a_region_can_be_cut_off_and_healed(lab):
    eu0, eu1, ap0 = lab.host("eu-0"), lab.host("eu-1"), lab.host("ap-0")
    lab.cut_region("eu")
    try:
        assert lab.udp_delivery(eu0, ap0, count=50, wait=0.5)["delivery"] == 0.0
        assert lab.udp_delivery(ap0, eu0, count=50, wait=0.5)["delivery"] == 0.0
        # Inside the region, traffic still flows (it crosses the router too).
        assert lab.udp_delivery(eu0, eu1, count=50)["delivery"] == 1.0
        # NATed hosts of the region are cut off as well (their public address is in the region).
        assert lab.udp_delivery(lab.host("home-0"), ap0, count=50, wait=0.5)["delivery"] == 0.0
    finally:
        lab.heal_region("eu")
    assert lab.udp_delivery(eu0, ap0, count=50)["delivery"] == 1.0


def test_nat_hides_its_hosts(lab):
    inside, inside2, us0 = lab.host("home-0"), lab.host("home-1"), lab.host("us-0")
    gw = lab.host("home")
    assert inside.kind == "private" and inside.public_ip == gw.ip
    # Out through the NAT works, with the region's delay.
    got = lab.tcp_rtt(inside, us0, count=5)
    assert got["failures"] == 0 and 79.5 <= got["min_ms"] <= 85, got
    # In from outside does not: neither the private address nor the gateway's public one.
    lab.start_echo(inside, 7100)
    assert not lab.tcp_connect(us0, inside.ip, 7100, timeout=1)["ok"]
    assert not lab.tcp_connect(us0, gw.ip, 7100, timeout=1)["ok"]
    # Hosts behind the same NAT reach each other directly.
    assert lab.tcp_connect(inside2, inside.ip, 7100, timeout=2)["ok"]


def test_teardown_leaves_nothing_even_when_the_body_fails():
    lab = Lab(regions={"x": 2, "y": 1}, nats={"n": ("x", 1)})
    with pytest.raises(RuntimeError, match="boom"):
        with lab:
            assert len(lab.leftovers()) == 1 + 3 + 2  # router, hosts, NAT gateway + its host
            server = lab.start_echo(lab.host("n-0"), 7200)
            router_pid = lab.router_proc.pid
            raise RuntimeError("boom")
    assert lab.leftovers() == []
    assert server.poll() is not None
    assert not os.path.exists(f"/proc/{router_pid}") or open(f"/proc/{router_pid}/stat").read().split()[2] == "Z"
    assert not lab.workdir.exists()
    ours = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.id not in ours
    assert PREFIX  # stale namespaces of crashed runs carry this prefix + their pid (cleanup_stale)


def test_leftovers_of_a_crashed_run_are_cleaned_by_prefix():
    from netlab import cleanup_stale

    dead_pid = 4_194_304  # PID_MAX_LIMIT: no process can have this pid
    stale = f"{PREFIX}{dead_pid}-0-eu-0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in cleanup_stale()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True)
    assert stale not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
