"""Benchmark on hosts in network namespaces (netlab): `python -m bench.netns [--json]`.

Measured on one lab, in one run (three regions, 5 ms RTT inside a region, eu–us 80, eu–ap 120,
us–ap 150 ms; peers on <region>-0 and -1, DHT probes on <region>-2):
- harness: RTT the delay router adds vs the configured RTT (TCP round trips between hosts), the
  router's own lateness (µs after each packet's due time), and TCP throughput through it;
- membership: RTTs that `potluck serve` peers measure to each other, in-region vs cross-region;
- dht_lookup: Coral clusters per region, and lookups (by `netlab.dhtprobe`, client-mode DHT nodes)
  of records held in eu's level-2 cluster, read from eu (in-region), from ap (cross-region), and
  from ap again (after the read cached them in ap);
- tokens_per_s: the default model (SmolLM2-135M) served whole by eu-0 and us-0 (`--blocks 0:30`),
  generated greedily by a user peer in each region (eu-1, us-1, ap-0), with the route's regions;
- recovery_after_kill: the eu server SIGKILLed while the eu user generates: seconds from the kill
  to the first step the us replica serves, and whether the output equals the undisturbed one;
- speculative: a far user on ap-2 (`bench.netns_client`, its own client process in that namespace;
  us–ap lowered to 120 ms for this measurement, so either replica is 120 ms away) generates the
  restating prompt (bench.pipeline's `RESTATE`) plain, then with prompt lookup: tok/s each,
  `speculative_over_plain`, tokens per pass, acceptance, `identical` output, and where a pass's
  time goes (the route's configured RTT vs the servers' compute per step).

- hole_punch: `netlab.netpeer` peers behind port-restricted NATs in eu (home) and us (cafe) meet
  through a relay on ap-1: request RTT on the relay (the target without hole punching: the
  baseline) vs after hole punching (`direct_over_relayed`), seconds from connecting to direct, and
  the outcome by the dialer's NAT kind (`by_dialer_nat`: port-restricted cafe, endpoint-independent
  cone, symmetric cgn, all in us) — a symmetric one must stay on the relay; `reachability`: seconds
  from starting a `potluck serve` peer with no NAT flags to autonat's verdict, behind the home NAT
  (private) and on a public host (public); and the same for
  generations: tok/s of a user behind the cafe NAT through a volunteer behind the home NAT serving the
  whole model (`potluck serve` peers, a swarm of their own around a relay on ap-1), the volunteer with
  `--no-hole-punch` (the baseline) vs after hole punching (`direct_over_relayed_tokens_per_s`).

--quick: everything but tokens_per_s and recovery_after_kill, the speculative and hole_punch tok/s figures on
fewer tokens.
Needs root (network namespaces); without it prints {"skipped": reason} and exits 0. The model is
converted once into --data-dir (default: potluck's, ~/.potluck); without it the pipeline
measurements report {"skipped": why}.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

REGIONS = {"eu": 3, "us": 3, "ap": 3}
NATS: dict[str, tuple[str, int] | tuple[str, int, str]] = {  # for hole_punch only
    "home": ("eu", 1), "cafe": ("us", 1), "cone": ("us", 1, "endpoint-independent"), "cgn": ("us", 1, "symmetric")}
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


def measure_dht_lookup(lab, peers, keys: int = 20, settle_timeout: float = 120.0) -> dict:
    """Level-2 clusters per region, then lookup latency of records held only in eu."""
    from netlab.dhtprobe import Probe, level2_by_region, settle_clusters

    try:
        settled_s = settle_clusters(peers, settle_timeout)
    except TimeoutError as e:
        return {"error": str(e)}
    by = level2_by_region(peers)
    ids = [p.peer_id for p in peers]
    probes = {r: Probe(lab, lab.region_hosts(r)[2], [peers[0].addr], above=ids) for r in ("eu", "ap")}
    try:
        for probe in probes.values():
            probe.ask("warm")
        names = [f"bench/{i}" for i in range(keys)]
        acks = probes["eu"].ask("store", keys=names, levels=[2], ttl=600)["acks"]
        runs = {
            "in_region_eu": probes["eu"].ask("lookup", keys=names)["results"],
            "cross_region_ap_to_eu": probes["ap"].ask("lookup", keys=names)["results"],
            "ap_again_after_caching": probes["ap"].ask("lookup", keys=names)["results"],
        }
    finally:
        for probe in probes.values():
            probe.close()
    out = {
        "clusters_settled_s": round(settled_s, 1),
        "level2_clusters": len(set().union(*by.values())),
        "store_acks_median": _median(acks),
        "keys": keys,
        "median_ms": {k: _median([r["ms"] for r in v]) for k, v in runs.items()},
        "p90_ms": {k: round(sorted(r["ms"] for r in v)[int(0.9 * (len(v) - 1))], 3) for k, v in runs.items()},
        "found_at_level": {k: sorted({r["level"] for r in v}) for k, v in runs.items()},
        "median_hops": {k: _median([r["hops"] for r in v]) for k, v in runs.items()},
        "all_found": all(r["found"] for v in runs.values() for r in v),
    }
    m = out["median_ms"]
    out["cross_over_in_region_ratio"] = round(m["cross_region_ap_to_eu"] / m["in_region_eu"], 1)
    return out


PROMPT = "The three primary colors are"
TOKENS = 16
SERVER_HOSTS = ("eu-0", "us-0")  # each serves the whole model: a full set of spans per region
USER_HOSTS = {"eu": "eu-1", "us": "us-1", "ap": "ap-0"}


def _regions_of(lab, route) -> list[str]:
    where = {p.peer_id: p.host.region for p in lab.peers}
    return [where.get(h["peer_id"], "?") for h in route]


def measure_tokens_per_s(lab, peers, runs: int = 3) -> dict:
    """Greedy generations of TOKENS tokens by a user in each region (after one warm-up)."""
    if not getattr(lab, "model_folder", None):
        return {"skipped": getattr(lab, "model_skip", "no model")}
    out: dict = {"tokens": TOKENS, "servers": {h: "0:30" for h in SERVER_HOSTS}}
    for region, host in USER_HOSTS.items():
        user = next(p for p in peers if p.host.name == host)
        user.call("generate", prompt=PROMPT, max_tokens=2)  # loads the client half, learns routes
        results = [user.call("generate", prompt=PROMPT, max_tokens=TOKENS) for _ in range(runs)]
        tps = [r["tokens_per_s"] for r in results]
        out[region] = {"user": host, "tokens_per_s_median": _median(tps), "tokens_per_s": [round(x, 2) for x in tps],
                       "ttft_s_median": _median([r["ttft_s"] for r in results if r.get("ttft_s") is not None]),
                       "route_regions": _regions_of(lab, results[-1]["route"])}
        lab.reference_ids = lab.reference_ids or results[-1]["token_ids"]
        out[region]["same_tokens_as_eu"] = all(r["token_ids"] == lab.reference_ids for r in results)
    return out


def measure_recovery_after_kill(lab, peers) -> dict:
    """SIGKILL eu's server while the eu user generates; time until the us replica serves a step."""
    import threading

    if not getattr(lab, "model_folder", None):
        return {"skipped": getattr(lab, "model_skip", "no model")}
    user = next(p for p in peers if p.host.name == USER_HOSTS["eu"])
    victim = next(p for p in peers if p.host.name == "eu-0")
    replica = next(p for p in peers if p.host.name == "us-0")
    steps = lambda p: p.call("status")["server"]["steps"]  # noqa: E731
    before = steps(victim)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(
        result=user.call("generate", prompt=PROMPT, max_tokens=TOKENS)), daemon=True)
    worker.start()
    deadline = time.monotonic() + 30
    while steps(victim) < before + 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    replica_before = steps(replica)
    victim.kill()
    killed = time.monotonic()
    recovered = None
    while time.monotonic() - killed < 60:
        if steps(replica) > replica_before:
            recovered = time.monotonic() - killed
            break
        time.sleep(0.02)
    worker.join(timeout=120)
    result = box.get("result")
    if result is None:
        return {"error": "the generation did not finish", "kill_to_replica_step_s": recovered}
    return {
        "kill_to_replica_step_s": round(recovered, 3) if recovered is not None else None,
        "recoveries": result["recoveries"],
        "identical_output": result["token_ids"] == lab.reference_ids if lab.reference_ids else None,
        "tokens_per_s_with_kill": round(result["tokens_per_s"], 2),
        "wall_s": result.get("wall_s"),
        "route_regions_after": _regions_of(lab, result["route"]),
    }


FAR_USER_HOST = "ap-2"  # no peer of the swarm there; its DHT probe has closed by then
FAR_USER_RTT_MS = 120.0  # to either replica while the far user measures (the issue: a user 80–120 ms away)
SPECULATIVE_TOKENS = {"full": 64, "quick": 24}


def measure_speculative(lab, peers, *, quick: bool = False, timeout: float = 300.0) -> dict:
    """The far user's restating generations, plain then with prompt lookup (bench.netns_client)."""
    import subprocess

    from netlab.topology import REPO_ROOT

    if not getattr(lab, "model_folder", None):
        return {"skipped": getattr(lab, "model_skip", "no model")}
    host = lab.host(FAR_USER_HOST)
    tokens = SPECULATIVE_TOKENS["quick" if quick else "full"]
    log_path = lab.workdir / f"netns-client-{host.name}.log"
    args = [sys.executable, "-m", "bench.netns_client", "--listen", f"/ip4/{host.ip}/tcp/4600",
            "--region", host.region, "--bootstrap", peers[0].addr, "--model", str(lab.model_folder),
            "--tokens", str(tokens)]
    lab.set_rtt("us", "ap", FAR_USER_RTT_MS)
    try:
        with open(log_path, "ab") as log:
            proc = host.popen(args, stdout=subprocess.PIPE, stderr=log, cwd=str(REPO_ROOT))
        lab.procs.append(proc)  # killed with the lab if it outlives the timeout below
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise TimeoutError(f"the far user did not finish in {timeout}s: {log_path.read_text()[-2000:]}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the far user exited {proc.returncode}: {log_path.read_text()[-2000:]}")
        out = json.loads(stdout)
        by_id = {p.peer_id: p.host for p in lab.peers}
        for name in ("plain", "prompt_lookup"):
            route = out[name].pop("route")
            servers = [by_id[h["peer_id"]] for h in route if h["peer_id"] in by_id]
            out[name]["route_hosts"] = [s.name for s in servers]
            # client-driven: a pass is one round trip from the user to each hop (the RTTs it ran under)
            out[name]["route_rtt_ms"] = sum(lab.expected_rtt_ms(host, s) for s in servers)
    finally:
        lab.set_rtt("us", "ap", RTT_MS[("us", "ap")])
    out["user"] = host.name
    return out


def _netpeer_result(lab, host, port: int, *args: str, timeout: float = 90.0) -> dict:
    """Start `netlab.netpeer` in host; its addresses once ready, or its JSON result with --dial."""
    from netlab.topology import REPO_ROOT, _read_line

    proc = host.popen([sys.executable, "-m", "netlab.netpeer", "--listen", f"/ip4/{host.ip}/tcp/{port}", *args,
                       "--lifetime", "120"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=str(REPO_ROOT),
                      bufsize=0)
    lab.procs.append(proc)
    addrs = []
    while (line := _read_line(proc, timeout)) != "ready":
        if not line:
            raise RuntimeError(f"netpeer in {host.name} did not start")
        if line.startswith("addr "):
            addrs.append(line.split()[1])
    if "--dial" not in args:
        return {"addrs": addrs}
    return json.loads(_read_line(proc, timeout) or '{"ok": false, "error": "no result"}')


NATED_TOKENS = {"full": 32, "quick": 12}


def measure_nated_tokens_per_s(lab, relay_host, home, cafe, *, tokens: int) -> dict:
    """tok/s of a user behind one NAT (cafe) through a volunteer behind another (home) serving the whole
    model, the two meeting through a relay on `relay_host`: the volunteer with `--no-hole-punch` (on
    the relay: the baseline), then a fresh volunteer and user on the same hosts after hole punching.
    A swarm of their own (the relay is their bootstrap), so the route is the volunteer's."""
    from potluck.localswarm import wait_until

    common = ["--model", str(lab.model_folder), "--threads", "1"]
    relay = lab.spawn_peer(relay_host, "--relay-service", port=4900, timeout=120)
    joined = ["--relay", relay.addr, "--bootstrap", relay.addr]
    out: dict = {}
    for port, mode, flags in ((4900, "relayed", ["--no-hole-punch"]), (4901, "direct", [])):
        volunteer = lab.peer_process(home, *common, "--blocks", "0:30", *joined, *flags, port=port).launch()
        user = lab.peer_process(cafe, *common, *joined, port=port).launch()
        for p in (volunteer, user):
            p.wait_ready(120)

        def through_volunteer(n: int) -> dict | None:
            try:
                r = user.call("generate", prompt=PROMPT, max_tokens=n, timeout=120)
            except RuntimeError:
                return None  # not announced yet
            return r if [h["peer_id"] for h in r["route"]] == [volunteer.peer_id] else None

        # the warm-up loads the client half, and (without --no-hole-punch) starts the hole punch
        wait_until(lambda: through_volunteer(2), 180, 2, message=f"a generation through the {mode} volunteer")
        if mode == "direct":
            wait_until(lambda: volunteer.status()["relay"]["hole_punch"]["direct"] >= 1, 60, 1,
                       message="the volunteer and the user hole punch")
        result = wait_until(lambda: through_volunteer(tokens), 120, 2, message=f"a {mode} generation")
        out[mode] = {"tokens_per_s": round(result["tokens_per_s"], 2), "token_ids": result["token_ids"],
                     "hole_punch": volunteer.status()["relay"]["hole_punch"]}
        volunteer.kill()
        user.kill()
    relayed, direct = out["relayed"]["tokens_per_s"], out["direct"]["tokens_per_s"]
    return {
        "tokens": tokens,
        "relayed_tokens_per_s": relayed,
        "direct_tokens_per_s": direct,
        "direct_over_relayed_tokens_per_s": round(direct / relayed, 3),
        "relayed_stayed_relayed": out["relayed"]["hole_punch"]["direct"] == 0,
        "same_tokens": out["relayed"]["token_ids"] == out["direct"]["token_ids"],
    }


def measure_reachability(lab, peers, timeout: float = 90.0) -> dict:
    """Seconds from launching a `potluck serve` peer (no NAT flags, bootstrapped from the lab's public
    peers) to autonat's verdict, behind the home NAT and on a public host; None if none came in time."""
    from potluck.localswarm import wait_until

    out: dict[str, float | None] = {}
    for name, host, want in (("private", lab.host("home-0"), "private"), ("public", lab.host("ap-2"), "public")):
        peer = lab.peer_process(host, "--bootstrap", peers[0].addr, port=4903).launch()
        started = time.monotonic()
        peer.wait_ready(120)
        try:
            wait_until(lambda peer=peer: peer.status()["reachability"]["status"] == want, timeout, 0.25,
                       message=f"autonat finds the peer on {host.name} {want}")
            out[f"{name}_detected_s"] = round(time.monotonic() - started, 2)
        except AssertionError:
            out[f"{name}_detected_s"] = None
        peer.kill()
    return out


def measure_hole_punch(lab, peers, *, quick: bool = False) -> dict:
    relay_host, home, cafe, cgn = lab.host("ap-1"), lab.host("home-0"), lab.host("cafe-0"), lab.host("cgn-0")
    relay = _netpeer_result(lab, relay_host, 4800, "--relay-service")["addrs"][0]
    baseline_target = _netpeer_result(lab, home, 4800, "--relay", relay, "--no-hole-punch")["addrs"][0]
    relayed = _netpeer_result(lab, cafe, 4800, "--dial", baseline_target, "--count", "20")
    target = _netpeer_result(lab, home, 4801, "--relay", relay)["addrs"][0]
    punched = _netpeer_result(lab, cafe, 4801, "--dial", target, "--count", "3", "--wait-direct", "30")
    cone = _netpeer_result(lab, lab.host("cone-0"), 4802, "--dial", target, "--count", "3", "--wait-direct", "30")
    symmetric = _netpeer_result(lab, cgn, 4802, "--dial", target, "--count", "3", "--wait-direct", "20")
    if not (relayed.get("ok") and punched.get("ok") and punched.get("direct")):
        return {"error": "no direct connection", "relayed": relayed, "punched": punched}
    by_dialer_nat = {kind: {"direct": bool(r.get("ok") and r.get("direct")), "direct_after_s": r.get("direct_after_s"),
                            **({"error": r["error"]} if r.get("error") else {})}  # (why it stayed relayed)
                     for kind, r in (("port-restricted", punched), ("endpoint-independent", cone),
                                     ("symmetric", symmetric))}
    return {
        "by_dialer_nat": by_dialer_nat,
        "reachability": measure_reachability(lab, peers),
        "network_relayed_ms": lab.expected_rtt_ms(cafe, relay_host) + lab.expected_rtt_ms(relay_host, home),
        "network_direct_ms": lab.expected_rtt_ms(cafe, home),
        "relayed_median_ms": relayed["median_ms"],
        "direct_median_ms": punched["direct_median_ms"],
        "direct_over_relayed": round(punched["direct_median_ms"] / relayed["median_ms"], 3),
        "direct_after_s": punched["direct_after_s"],
        "failed_requests_while_moving": punched["switch_failures"],
        "symmetric_stays_relayed": bool(symmetric.get("ok") and not symmetric.get("direct")),
        # the same route's generation speed, on the relay vs direct
        **(measure_nated_tokens_per_s(lab, relay_host, home, cafe, tokens=NATED_TOKENS["quick" if quick else "full"])
           if getattr(lab, "model_folder", None) else {"tokens_per_s": {"skipped": getattr(lab, "model_skip", "no model")}}),
    }


MEASUREMENTS = {
    "router": measure_router,
    "membership_rtt": measure_membership_rtt,
    "dht_lookup": measure_dht_lookup,
    "tokens_per_s": measure_tokens_per_s,
    "speculative": measure_speculative,  # before the kill: both replicas up
    "recovery_after_kill": measure_recovery_after_kill,
    "hole_punch": measure_hole_punch,
}


MODEL_MEASUREMENTS = {"tokens_per_s", "recovery_after_kill"}  # --quick skips these


def _start_peers(lab, data_dir: str | None) -> list:
    """eu-0 and us-0 serve the whole model, eu-1/us-1/ap-0 are users, ap-1 a plain peer. Without the
    model: six plain peers (the pipeline measurements then say why they were skipped)."""
    lab.model_folder, lab.model_skip, lab.reference_ids = None, None, None
    try:
        from pipeline.convert import ensure_default_model
        from potluck.cli import DEFAULT_DATA_DIR

        lab.model_folder = ensure_default_model(data_dir or DEFAULT_DATA_DIR, progress=False)
    except Exception as e:  # noqa: BLE001 - the harness figures are still worth having
        lab.model_skip = f"default model unavailable: {type(e).__name__}: {e}"
    hosts = [lab.region_hosts(r)[j] for r in REGIONS for j in (0, 1)]
    if lab.model_folder is None:
        return lab.swarm(hosts)
    common = ["--model", str(lab.model_folder), "--threads", "1"]

    def args(host) -> list[str]:
        if host.name in SERVER_HOSTS:
            return [*common, "--blocks", "0:30"]
        return common if host.name in USER_HOSTS.values() else []

    first = lab.spawn_peer(hosts[0], *args(hosts[0]), timeout=120)
    rest = [lab.peer_process(h, *args(h), "--bootstrap", first.addr).launch() for h in hosts[1:]]
    for p in rest:
        p.wait_ready(120)
    peers = [first, *rest]
    from potluck.localswarm import wait_until

    servers = [p for p in peers if p.host.name in SERVER_HOSTS]
    wait_until(lambda: all(p.call("status")["server"]["start"] is not None for p in servers), 180, 1,
               message="servers loaded and announced")
    return peers


def run(data_dir: str | None = None, *, quick: bool = False) -> dict:
    from netlab import Lab, skip_reason
    from potluck.localswarm import wait_until

    reason = skip_reason()
    if reason:
        return {"skipped": reason}
    started = time.monotonic()
    with Lab(regions=REGIONS, rtt_ms=RTT_MS, intra_rtt_ms=INTRA_RTT_MS, nats=NATS) as lab:
        result: dict = {
            "config": {"regions": REGIONS, "intra_rtt_ms": INTRA_RTT_MS,
                       "inter_rtt_ms": {f"{a}-{b}": v for (a, b), v in RTT_MS.items()}},
            "lab_setup_s": round(lab.setup_s, 3),
        }
        t = time.monotonic()
        peers = _start_peers(lab, data_dir)
        ids = {p.peer_id for p in peers}
        for p in peers:
            wait_until(lambda p=p: p.alive_peers() >= ids - {p.peer_id}, 90, message=f"{p.host.name} sees all")
        result["swarm_formed_s"] = round(time.monotonic() - t, 2)
        model_folder = getattr(lab, "model_folder", None)  # set by _start_peers, like the measurements read it
        result["model"] = str(model_folder) if model_folder else {"skipped": getattr(lab, "model_skip", "no model")}
        measurements: dict[str, Callable[..., dict]] = {
            **MEASUREMENTS, "speculative": functools.partial(measure_speculative, quick=quick),
            "hole_punch": functools.partial(measure_hole_punch, quick=quick)}
        for name, fn in measurements.items():
            if quick and name in MODEL_MEASUREMENTS:
                continue
            try:
                result[name] = fn(lab, peers)
            except Exception as e:  # one failed measurement should not hide the others
                result[name] = {"error": f"{type(e).__name__}: {e}"}
    result["total_s"] = round(time.monotonic() - started, 1)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.netns", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--data-dir", help="where the default model is converted (default: potluck's data dir)")
    parser.add_argument("--quick", action="store_true",
                        help="no per-region tokens/s or kill; the speculative figure on fewer tokens (the test suite "
                             "runs it)")
    args = parser.parse_args(argv)
    result = run(args.data_dir, quick=args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
