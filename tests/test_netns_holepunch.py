"""NAT kinds in the lab (endpoint-independent, port-restricted, symmetric) and hole punching (DCUtR)
through them between `netlab.netpeer` processes.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import json
import subprocess
import sys

import pytest

from netlab import Lab, skip_reason
from netlab.topology import REPO_ROOT, _read_line
from p2p.swarm_key import new_key_file
from potluck.localswarm import wait_until

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


@pytest.fixture(scope="module")
def lab():
    nats = {f"{kind[:3]}-{region}": (region, 1, kind) for kind in ("endpoint-independent", "port-restricted", "symmetric")
            for region in ("eu", "us")}
    with Lab(regions={"eu": 1, "us": 1}, nats=nats) as lab:
        yield lab


def _netpeer(lab, host, port, *args, lifetime=90):
    proc = host.popen([sys.executable, "-m", "netlab.netpeer", "--listen", f"/ip4/{host.ip}/tcp/{port}", *args,
                       "--lifetime", str(lifetime)],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT), bufsize=0)
    lab.procs.append(proc)
    return proc


def _addrs(proc, timeout=30):
    """The peer's addresses once it printed `ready`."""
    addrs = []
    while (line := _read_line(proc, timeout)) != "ready":
        assert line, "netpeer did not start"
        if line.startswith("addr "):
            addrs.append(line.split()[1])
    return addrs


def _punch(lab, nat_kind, port, *options):
    """A peer behind a `nat_kind` NAT in eu, reachable through a relay in us, dialled by a peer behind
    another `nat_kind` NAT in us (each peer started with `options` too); the dialer's JSON result after
    waiting for a direct connection."""
    relay_addr = _addrs(_netpeer(lab, lab.host("us-0"), port, "--relay-service", *options))[0]
    target = _addrs(_netpeer(lab, lab.host(f"{nat_kind[:3]}-eu-0"), port, "--relay", relay_addr, *options))[0]
    assert "/p2p-circuit/" in target
    dialer = _netpeer(lab, lab.host(f"{nat_kind[:3]}-us-0"), port, "--dial", target, "--count", "5",
                      "--wait-direct", "25", *options)
    _addrs(dialer)
    result = json.loads(_read_line(dialer, 90) or '{"ok": false, "error": "no result"}')
    print(nat_kind, json.dumps(result))
    assert result["ok"], result
    return result


@pytest.mark.parametrize("nat_kind", ["endpoint-independent", "port-restricted"])
def test_peers_behind_cone_nats_move_from_the_relay_to_a_direct_connection(lab, nat_kind):
    result = _punch(lab, nat_kind, 4700 if nat_kind == "port-restricted" else 4710)
    # Only a direct connection is left, the session runs on it, and no request failed on the way.
    assert result["direct"] and result["connections"] == ["direct"], result
    assert result["switch_failures"] == 0, result
    assert result["direct_median_ms"] > 0, result  # requests keep working on the direct connection


def test_private_swarm_members_behind_cone_nats_move_from_the_relay_to_a_direct_connection(lab, tmp_path):
    """Every peer holds the swarm key: none runs identify, so the members learn where their NATs show
    them from the relay's gate handshake, and punch through as open-swarm peers do."""
    key = tmp_path / "swarm.key"
    new_key_file(key)
    result = _punch(lab, "endpoint-independent", 4730, "--swarm-key", str(key))
    assert result["direct"] and result["connections"] == ["direct"], result
    assert result["switch_failures"] == 0, result
    assert result["direct_median_ms"] > 0, result


def test_peers_behind_symmetric_nats_stay_relayed(lab):
    result = _punch(lab, "symmetric", 4720)
    assert not result["direct"] and result["connections"] == ["relayed"], result
    assert result["switch_failures"] == 0, result


def test_potluck_volunteers_behind_nats_end_up_direct():
    """`potluck serve` volunteers behind two port-restricted NATs meet through a relay in a third region
    and hole punch: their ping RTT drops from both relay legs (eu-ap 120 + ap-us 150 ms) to the
    direct eu-us path (80 ms), which no relayed path can reach."""
    _volunteers_end_up_direct()


def test_private_swarm_volunteers_behind_nats_end_up_direct(tmp_path):
    """The same with `--swarm-key` on every peer: a private swarm's volunteers hole punch too."""
    key = tmp_path / "swarm.key"
    new_key_file(key)
    _volunteers_end_up_direct("--swarm-key", str(key))


def _volunteers_end_up_direct(*options: str) -> None:
    with Lab(regions={"eu": 1, "us": 1, "ap": 1}, nats={"home": ("eu", 1), "cafe": ("us", 1)}) as lab:
        seed = lab.spawn_peer(lab.host("ap-0"), "--relay-service", *options, port=4004)
        home, cafe = lab.spawn_peers([lab.host("home-0"), lab.host("cafe-0")], "--bootstrap", seed.addr,
                                     "--relay", seed.addr, *options, port=4004)
        wait_until(lambda: cafe.peer_id in home.alive_peers() and home.peer_id in cafe.alive_peers(), 40,
                   message="home and cafe reach each other")
        relayed_floor = lab.expected_rtt_ms(home.host, seed.host) + lab.expected_rtt_ms(seed.host, cafe.host)
        direct = lab.expected_rtt_ms(home.host, cafe.host)
        wait_until(lambda: (r := home.peers_by_id()[cafe.peer_id]["rtt_ms"]) is not None and r < relayed_floor - 60,
                   60, 1.0, message="home's ping RTT to cafe drops below any relayed path")
        rtt = home.peers_by_id()[cafe.peer_id]["rtt_ms"]
        print(f"home -> cafe after hole punching: {rtt} ms (direct network {direct:g} ms, relayed {relayed_floor:g} ms)")
        assert rtt >= direct - 0.5
