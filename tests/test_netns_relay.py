"""Circuit relay v2 (py-libp2p 0.8.1) across real NATs: two volunteers behind different NATs talk
through a public relay peer, with our session protocol on top (feasibility, see netlab/relay_experiment.py).

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import json
import subprocess
import sys

import pytest

from netlab import Lab, skip_reason
from netlab.topology import REPO_ROOT, _read_line

_reason = skip_reason()
pytestmark = pytest.mark.skipif(_reason is not None, reason=_reason or "")


def _start(lab, host, *args):
    proc = host.popen([sys.executable, "-m", "netlab.relay_experiment", *args, "--lifetime", "90"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
    lab.procs.append(proc)
    return proc


def test_circuit_relay_v2_carries_a_session_between_two_nats():
    with Lab(regions={"eu": 1, "us": 1}, nats={"home": ("eu", 1), "cafe": ("us", 1)}) as lab:
        relay_host, home, cafe = lab.host("us-0"), lab.host("home-0"), lab.host("cafe-0")
        relay = _start(lab, relay_host, "relay", "--listen", f"/ip4/{relay_host.ip}/tcp/4500")
        line = _read_line(relay, 30)
        assert line.startswith("addr "), line
        relay_addr = line.split()[1]
        target = _start(lab, home, "target", "--listen", f"/ip4/{home.ip}/tcp/4500", "--relay", relay_addr)
        line = _read_line(target, 30)
        assert line.startswith("peer "), line
        target_id = line.split()[1]
        assert _read_line(target, 30) == "reserved"
        # Directly, the NATed target cannot be reached.
        assert not lab.tcp_connect(cafe, home.ip, 4500, timeout=1)["ok"]
        dialer = _start(lab, cafe, "dialer", "--listen", f"/ip4/{cafe.ip}/tcp/4500", "--relay", relay_addr,
                        "--target", target_id, "--count", "10")
        result = json.loads(_read_line(dialer, 60) or "{}")
        print(result)
        assert result.get("ok"), result
        # home (eu) -> relay (us) -> cafe (us): one eu-us RTT (80 ms) + one in-region RTT (5 ms) per request.
        assert 85 <= result["median_request_ms"] < 85 + 80, result
