"""Benchmark on hosts in network namespaces (netlab): `python -m bench.netns [--json]`.

Measured on one lab, in one run:
- harness: RTT the delay router adds vs the configured RTT (TCP round trips between hosts), the
  router's own lateness (µs after each packet's due time), and TCP throughput through it;
- membership: RTTs that `potluck serve` peers measure to each other, in-region vs cross-region.

Not yet measured (each reports {"skipped": why} until its layer is wired into `potluck serve`):
DHT lookup latency in-region vs cross-region, tokens/s per region, recovery time after a server
kill. Each is one `measure_*(lab, peers) -> dict` function below; add it to MEASUREMENTS.

Needs root (network namespaces); without it prints {"skipped": reason} and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

REGIONS = {"eu": 2, "us": 2, "ap": 2}
RTT_MS = {("eu", "us"): 80.0, ("eu", "ap"): 120.0, ("us", "ap"): 150.0}
INTRA_RTT_MS = 5.0


def _median(xs):
    return round(statistics.median(xs), 3) if xs else None


def measure_router(lab, peers) -> dict:
    """Configured vs measured TCP RTT for each region pair, router lateness, TCP throughput."""
    pairs = []
    hosts = {r: lab.region_hosts(r) for r in lab.regions}
    for a_region, b_region in [("eu", "eu"), ("eu", "us"), ("eu", "ap"), ("us", "ap")]:
        a = hosts[a_region][0]
        b = hosts[b_region][1] if a_region == b_region else hosts[b_region][0]
        got = lab.tcp_rtt(a, b, count=50, interval=0.005)
        want = lab.expected_rtt_ms(a, b)
        pairs.append({
            "pair": f"{a.name}->{b.name}", "configured_ms": want, "min_ms": got["min_ms"],
            "median_ms": got["median_ms"], "p90_ms": got["p90_ms"],
            "added_median_ms": round(got["median_ms"] - want, 3),
        })
    idle_stats = lab.router_stats()
    bulk_in = lab.tcp_bulk(hosts["eu"][0], hosts["eu"][1], nbytes=16 << 20)
    bulk_cross = lab.tcp_bulk(hosts["eu"][0], hosts["us"][0], nbytes=8 << 20)
    loaded_stats = lab.router_stats()
    return {
        "tcp_rtt": pairs,
        "added_rtt_ms_median_over_pairs": _median([p["added_median_ms"] for p in pairs]),
        "router_lateness_us_light_load": idle_stats["lateness_us"],
        "router_lateness_us_after_bulk": loaded_stats["lateness_us"],
        "tcp_bulk_mb_per_s": {"in_region": bulk_in["mb_per_s"], "cross_region_80ms": bulk_cross["mb_per_s"]},
        "router_packets": loaded_stats["sent"], "router_queue_drops": loaded_stats["dropped_queue"],
    }


def measure_membership_rtt(lab, peers, settle_s: float = 12.0) -> dict:
    """Smoothed RTTs the peers' membership pings measure (libp2p session request/response)."""
    time.sleep(settle_s)
    host_of = {p.peer_id: p.host for p in peers}
    by_class: dict[str, list[float]] = {"in_region": []}
    excess: dict[str, list[float]] = {}
    for p in peers:
        for q in p.status()["peers"]:
            other = host_of.get(q["peer_id"])
            if other is None or q["rtt_ms"] is None:
                continue
            want = lab.expected_rtt_ms(p.host, other)
            key = "in_region" if other.region == p.host.region else f"cross_{int(want)}ms"
            by_class.setdefault(key, []).append(q["rtt_ms"])
            excess.setdefault(key, []).append(q["rtt_ms"] - want)
    cross = [x for k, v in by_class.items() if k != "in_region" for x in v]
    return {
        "median_ms": {k: _median(v) for k, v in sorted(by_class.items())},
        "median_excess_over_configured_ms": {k: _median(v) for k, v in sorted(excess.items())},
        "cross_over_in_region_ratio": round(statistics.median(cross) / statistics.median(by_class["in_region"]), 2)
        if cross and by_class["in_region"] else None,
        "samples": sum(len(v) for v in by_class.values()),
    }


def measure_dht_lookup(lab, peers) -> dict:
    return {"skipped": "the DHT is not wired into `potluck serve` yet; add in-region vs cross-region lookups here"}


def measure_tokens_per_s(lab, peers) -> dict:
    return {"skipped": "the pipeline is not wired into `potluck serve` yet; add per-region tokens/s here"}


def measure_recovery_after_kill(lab, peers) -> dict:
    return {"skipped": "needs the pipeline: time from a server kill to the next generated token"}


MEASUREMENTS = {
    "router": measure_router,
    "membership_rtt": measure_membership_rtt,
    "dht_lookup": measure_dht_lookup,
    "tokens_per_s": measure_tokens_per_s,
    "recovery_after_kill": measure_recovery_after_kill,
}


def run() -> dict:
    from netlab import Lab, skip_reason
    from potluck.localswarm import wait_until

    reason = skip_reason()
    if reason:
        return {"skipped": reason}
    started = time.monotonic()
    with Lab(regions=REGIONS, rtt_ms=RTT_MS, intra_rtt_ms=INTRA_RTT_MS) as lab:
        result: dict = {
            "config": {"regions": REGIONS, "intra_rtt_ms": INTRA_RTT_MS,
                       "inter_rtt_ms": {f"{a}-{b}": v for (a, b), v in RTT_MS.items()}},
            "lab_setup_s": round(lab.setup_s, 3),
        }
        t = time.monotonic()
        peers = lab.swarm([h for h in lab.hosts.values() if h.kind == "host"])
        ids = {p.peer_id for p in peers}
        for p in peers:
            wait_until(lambda p=p: p.alive_peers() >= ids - {p.peer_id}, 90, message=f"{p.host.name} sees all")
        result["swarm_formed_s"] = round(time.monotonic() - t, 2)
        for name, fn in MEASUREMENTS.items():
            try:
                result[name] = fn(lab, peers)
            except Exception as e:  # one failed measurement should not hide the others
                result[name] = {"error": f"{type(e).__name__}: {e}"}
    result["total_s"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.netns", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    result = run()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
