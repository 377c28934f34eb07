"""Circuit relay v2 (p2p.libp2p.relay) across real NATs: two volunteers behind different NATs talk through a
public relay peer, with our session protocol (and the swarm key gate) on top. Each peer is a
`netlab.netpeer` process (a bare Libp2pNetwork, public API only) in its own namespace.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import json
import subprocess
import sys

import pytest

from netlab import Lab, skip_reason
from netlab.topology import REPO_ROOT, _read_line
from p2p.swarm_key import new_key_file

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]


@pytest.fixture(scope="module")
def lab():
    # cafe's NAT is symmetric so that the peers stay on the relay (hole punching cannot pass it).
    with Lab(regions={"eu": 1, "us": 1}, nats={"home": ("eu", 1), "cafe": ("us", 1, "symmetric")}) as lab:
        yield lab


def _start(lab, host, port, *args, lifetime=90):
    proc = host.popen([sys.executable, "-m", "netlab.netpeer", "--listen", f"/ip4/{host.ip}/tcp/{port}", *args,
                       "--lifetime", str(lifetime)],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
    lab.procs.append(proc)
    return proc


def _ready(proc, timeout=30):
    """(peer id, addrs) once the peer printed `ready`; the JSON error line if it failed to start."""
    peer, addrs = None, []
    while True:
        line = _read_line(proc, timeout)
        if line.startswith("peer "):
            peer = line.split()[1]
        elif line.startswith("addr "):
            addrs.append(line.split()[1])
        elif line == "ready":
            return peer, addrs
        else:
            return json.loads(line or '{"ok": false, "error": "no output"}'), None


def _result(proc, timeout=60):
    _ready(proc, timeout)
    return json.loads(_read_line(proc, timeout) or '{"ok": false, "error": "no result"}')


def test_two_volunteers_behind_different_nats_talk_through_a_relay(lab):
    relay_host, home, cafe = lab.host("us-0"), lab.host("home-0"), lab.host("cafe-0")
    relay_id, relay_addrs = _ready(_start(lab, relay_host, 4500, "--relay-service"))
    relay_addr = relay_addrs[0]
    assert "/p2p-circuit" not in relay_addr
    home_id, home_addrs = _ready(_start(lab, home, 4500, "--relay", relay_addr))
    # The NATed peer announces its circuit address first, then its (private) listen address.
    circuit = home_addrs[0]
    assert circuit == f"{relay_addr}/p2p-circuit/p2p/{home_id}", home_addrs
    assert home_addrs[1].startswith(f"/ip4/{home.ip}/")
    # Directly, it cannot be reached.
    assert not lab.tcp_connect(cafe, home.ip, 4500, timeout=1)["ok"]
    result = _result(_start(lab, cafe, 4500, "--dial", circuit, "--compare", relay_addr, "--count", "20"))
    assert result["ok"], result
    assert result["peer"] == home_id
    via_relay = lab.expected_rtt_ms(cafe, relay_host) + lab.expected_rtt_ms(relay_host, home)
    overhead = result["median_ms"] - via_relay
    print(f"cafe -> home through the relay: {result['median_ms']} ms (network {via_relay:g} ms, "
          f"overhead {overhead:.1f} ms); cafe -> relay direct: {result['compare_median_ms']} ms "
          f"(network {lab.expected_rtt_ms(cafe, relay_host):g} ms); connect {result['connect_ms']} ms")
    # us (cafe) -> us (relay) -> eu (home): one in-region RTT (5 ms) + one eu-us RTT (80 ms) per request.
    assert via_relay <= result["median_ms"] < via_relay + 60, result


def test_swarm_key_gate_holds_over_the_relay(lab, tmp_path):
    key, other = tmp_path / "swarm.key", tmp_path / "other.key"
    new_key_file(key)
    new_key_file(other)
    relay_host, home, cafe, outsider = lab.host("us-0"), lab.host("home-0"), lab.host("cafe-0"), lab.host("eu-0")
    _, relay_addrs = _ready(_start(lab, relay_host, 4600, "--relay-service", "--swarm-key", str(key)))
    relay_addr = relay_addrs[0]
    home_id, home_addrs = _ready(_start(lab, home, 4600, "--relay", relay_addr, "--swarm-key", str(key)))
    circuit = home_addrs[0]
    assert "/p2p-circuit/" in circuit
    # A member reaches the NATed member through the relay.
    result = _result(_start(lab, cafe, 4600, "--dial", circuit, "--swarm-key", str(key), "--count", "3"))
    assert result["ok"] and result["peer"] == home_id, result
    # An outsider without the key, or with another key, cannot reserve on the relay ...
    for i, extra in enumerate(([], ["--swarm-key", str(other)])):
        proc = _start(lab, outsider, 4610 + i, "--relay", relay_addr, *extra)
        failed, addrs = _ready(proc)
        assert addrs is None and not failed["ok"] and failed["error"].startswith("SwarmKeyMismatch"), failed
        assert proc.wait(timeout=10) == 2
        # ... nor reach the member through it.
        result = _result(_start(lab, outsider, 4620 + i, "--dial", circuit, *extra, "--count", "1"))
        assert not result["ok"] and result["error"].startswith("SwarmKeyMismatch"), result
