"""The DHT of real `potluck serve` peers on hosts in network namespaces, three regions with real delay
(5 ms RTT inside a region; eu–us 80, eu–ap 120, us–ap 150 ms): Coral clusters follow the regions,
and a lookup answered inside the reader's region is faster than one that has to leave it.

Lookups are timed by `netlab.dhtprobe` (a client-mode DHT node in a namespace of its own region):
in a swarm this small every peer holds every record (k = 20 replicas per level) and `dht_get`
answers from the peer's own copy, so timing `dht_get` would time the control socket.

Needs root, `ip`, `iptables`, `tc` and /dev/net/tun (scripts/setup-netns.sh); skips otherwise."""

import statistics

import pytest
from netlab import Lab, skip_reason
from netlab.dhtprobe import Probe, level2_by_region, settle_clusters
from potluck.localswarm import wait_until

_reason = skip_reason()
pytestmark = [pytest.mark.skipif(_reason is not None, reason=_reason or ""), pytest.mark.slow]

REGIONS = {"eu": 3, "us": 3, "ap": 3}  # peers on <region>-0 and -1; probes on <region>-2
RTT_MS = {("eu", "us"): 80.0, ("eu", "ap"): 120.0, ("us", "ap"): 150.0}
KEYS = 12


@pytest.fixture(scope="module")
def swarm():
    with Lab(regions=REGIONS, rtt_ms=RTT_MS, intra_rtt_ms=5) as lab:
        hosts = [lab.host(f"{r}-{j}") for r in REGIONS for j in (0, 1)]
        peers = lab.swarm(hosts, port=4001)
        settled_s = settle_clusters(peers)
        print(f"clusters settled {settled_s:.1f}s after the swarm started")
        ids = [p.peer_id for p in peers]
        probes = {r: Probe(lab, lab.host(f"{r}-2"), [peers[0].addr], above=ids) for r in ("eu", "ap")}
        for probe in probes.values():
            probe.ask("warm")  # connects to every peer and learns its cluster
        yield lab, peers, probes


def test_each_region_is_one_level2_cluster(swarm):
    lab, peers, probes = swarm
    status = {p: p.call("status")["dht"] for p in peers}
    labels = {p.host.name: (s["clusters"]["1"], s["clusters"]["2"]) for p, s in status.items()}
    print("cluster labels (level 1, level 2):", {h: (a[-6:], b[-6:]) for h, (a, b) in labels.items()})
    by = level2_by_region(peers)
    assert all(len(v) == 1 for v in by.values()), by  # one label per region…
    assert len(set().union(*by.values())) == 3, by  # …and a different one in each
    assert all(s["ready"] for s in status.values())
    # Peers that bootstrapped at the same moment may not have heard of each other (a table holds only
    # peers that answered, and an idle peer only pings a few it knows): in use, a store's walk meets
    # every peer of a swarm this small, through the bootstrap peer that knows them all.
    rounds = iter(range(100))

    def level0_full():
        i = next(rounds)
        if all(p.call("status")["dht"]["table"]["0"] == 5 for p in peers):  # every other peer
            return True
        for p in peers:
            p.call("dht_store", key=f"level0/{p.peer_id}/{i}", value=i, ttl=60)
        return False

    wait_until(level0_full, 30, 1, message="each level-0 table to hold every other peer")
    # A peer that joins a cluster walks to itself there at once, so the members add it within
    # seconds (not at their next maintenance round, up to 30 s away).
    tables = lambda: {p.host.name: p.call("status")["dht"]["table"]["2"] for p in peers}  # noqa: E731
    wait_until(lambda: all(n == 1 for n in tables().values()), 10, 0.5,  # its region's other peer only
               message="each level-2 table to hold its region's other peer")
    # ap is > 100 ms from both other regions, so it is alone at level 1 too.
    ap_l1 = {labels[f"ap-{j}"][0] for j in (0, 1)}
    assert len(ap_l1) == 1 and not ap_l1 & {labels[h][0] for h in ("eu-0", "eu-1", "us-0", "us-1")}
    # The probes, with their own RTT measurements, joined their region's cluster.
    for region, probe in probes.items():
        assert probe.ask("status")["clusters"]["2"] == next(iter(by[region])), region


def test_in_region_lookups_are_faster_than_cross_region(swarm):
    """A record held in eu (stored at eu's level-2 cluster) read from eu and from ap."""
    lab, peers, probes = swarm
    keys = [f"netns-dht/{i}" for i in range(KEYS)]
    acks = probes["eu"].ask("store", keys=keys, levels=[2], ttl=600)["acks"]
    assert acks == [2] * KEYS, acks  # both eu peers, nobody else

    eu = probes["eu"].ask("lookup", keys=keys)["results"]
    ap = probes["ap"].ask("lookup", keys=keys)["results"]  # each key read once: the read caches it in ap
    ap_again = probes["ap"].ask("lookup", keys=keys)["results"]
    eu_ids = {p.peer_id for p in peers if p.host.region == "eu"}
    ap_ids = {p.peer_id for p in peers if p.host.region == "ap"}
    for r in eu + ap + ap_again:
        assert r["found"], r
    assert all(r["level"] == 2 and set(r["holders"]) <= eu_ids for r in eu), eu
    assert all(r["level"] == 0 and set(r["holders"]) <= eu_ids for r in ap), ap  # left its region
    assert all(r["level"] == 2 and set(r["holders"]) <= ap_ids for r in ap_again), ap_again  # Coral's cache
    med = {name: statistics.median(r["ms"] for r in rs) for name, rs in
           (("eu_in_region", eu), ("ap_cross_region", ap), ("ap_after_caching", ap_again))}
    print(f"DHT lookup medians over {KEYS} keys (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in med.items())
          + f"; hops in/cross: {statistics.median(r['hops'] for r in eu)}/{statistics.median(r['hops'] for r in ap)}")
    rtt_eu_ap = RTT_MS[("eu", "ap")]
    assert med["ap_cross_region"] >= rtt_eu_ap - 1  # at least one eu–ap round trip: the network is real
    assert med["eu_in_region"] < rtt_eu_ap / 2
    assert med["ap_after_caching"] < rtt_eu_ap / 2
    assert med["eu_in_region"] * 3 < med["ap_cross_region"]


def test_records_stored_by_one_peer_are_read_by_every_peer(swarm):
    """Through the peers' own control commands: every peer reads it, and finds every peer."""
    lab, peers, probes = swarm
    writer = peers[0]
    assert writer.call("dht_store", key="netns-dht/hello", value={"from": "eu"}, ttl=300)["stored_at"] >= 5
    for p in peers:
        got = wait_until(lambda p=p: p.call("dht_get", key="netns-dht/hello"), 15, 0.5, message=f"{p.host.name} reads")
        assert got[writer.peer_id]["value"] == {"from": "eu"}
        assert p.call("dht_find_peer", peer_id=peers[-1].peer_id)["addr"] == peers[-1].addr or p is peers[-1]
