"""NAT kinds in the lab (endpoint-independent, port-restricted, symmetric) and hole punching (DCUtR)
through them between `netlab.netpeer` processes.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import json
import subprocess
import sys

import pytest

from netlab import Lab, skip_reason
from netlab.topology import REPO_ROOT, _read_line

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

WHOAMI_PORT = 7100
LOCAL_PORT = 5555


def _probe(lab, host, *args):
    proc = host.popen([sys.executable, "-m", "netlab.probe", *args], stdout=subprocess.PIPE,
                      stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
    lab.procs.append(proc)
    return proc


def _mapping(lab, private, servers, stranger):
    """How private's NAT maps LOCAL_PORT towards each server, and whether `stranger` (an outside host
    that was never contacted) reaches the first mapping."""
    proc = _probe(lab, private, "udp-map", str(LOCAL_PORT), "--wait", "2",
                  *[arg for s in servers for arg in ("--server", f"{s.ip}:{WHOAMI_PORT}")])
    observed = json.loads(_read_line(proc, 15))["observed"]
    assert len(observed) == len(servers), observed
    mapped = [observed[f"{s.ip}:{WHOAMI_PORT}"] for s in servers]
    ip, port = mapped[0].split(":")
    stranger.exec([sys.executable, "-m", "netlab.probe", "udp-send", ip, port, "--count", "10"])
    unsolicited = json.loads(_read_line(proc, 15))["unsolicited"]
    proc.wait(timeout=5)
    return mapped, unsolicited


def test_nat_kinds_map_and_filter_as_named():
    with Lab(regions={"eu": 3}, nats={"cone": ("eu", 1, "endpoint-independent"),
                                      "home": ("eu", 1, "port-restricted"),
                                      "cgn": ("eu", 1, "symmetric")}) as lab:
        servers, stranger = [lab.host("eu-0"), lab.host("eu-1")], lab.host("eu-2")
        for s in servers:
            assert _read_line(_probe(lab, s, "udp-whoami", str(WHOAMI_PORT), "--lifetime", "120"), 15) == "ready"
        results = {nat: _mapping(lab, lab.host(f"{nat}-0"), servers, stranger) for nat in ("cone", "home", "cgn")}
        print(json.dumps(results))
        for nat in ("cone", "home"):
            mapped, unsolicited = results[nat]
            # Endpoint-independent, port-preserving mapping: both servers see the NAT's address and our port.
            assert mapped == [f"{lab.host(nat).ip}:{LOCAL_PORT}"] * 2, (nat, mapped)
        # Filtering: only the full-cone NAT lets a host we never contacted through to the mapping.
        unsolicited = results["cone"][1]
        assert len(unsolicited) == 1 and unsolicited[0].startswith(f"{stranger.ip}:"), results["cone"]
        assert results["home"][1] == [], results["home"]
        mapped, unsolicited = results["cgn"]
        ips = {m.split(":")[0] for m in mapped}
        ports = [int(m.split(":")[1]) for m in mapped]
        assert ips == {lab.host("cgn").ip} and ports[0] != ports[1], mapped
        assert unsolicited == [], results["cgn"]
