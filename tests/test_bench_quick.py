"""Every benchmark's `--quick --json` runs and prints its headline figures, so none rots unnoticed.

Each bench runs as its users run it (`python -m bench.NAME --quick --json`, a fresh process) and
the test checks the figures the README and the issues quote are present and plausible — not their
values, which depend on the machine (tests do not assert timings).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(name: str, *args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", "--quick", "--json", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def figure(report: dict, path: str) -> float:
    """The number at a dotted path (list items by index); fails naming the path when it is missing."""
    value: object = report
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value.get(part)  # type: ignore[union-attr]
        assert value is not None, f"{path} missing from {json.dumps(report)[:2000]}"
    assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path} = {value!r}"
    assert math.isfinite(value), f"{path} = {value!r}"
    return float(value)


def test_hop_quick():
    r = run_bench("hop")
    assert figure(r, "rtt_16k.libp2p.median_ms") > 0 and figure(r, "rtt_16k.tcp.median_ms") > 0
    assert figure(r, "ratios.rtt_median_libp2p_over_tcp") > 0
    assert figure(r, "ratios.throughput_libp2p_over_tcp") > 0
    for n in (1, 2, 3):  # a first contact past n black holes, dialled in turn and staggered
        assert figure(r, f"first_contact_s.black_holes_{n}.in_turn") > 0
        assert figure(r, f"first_contact_s.black_holes_{n}.staggered") > 0


def test_gossip_sim_quick():
    r = run_bench("gossip_sim")
    assert [run["loss"] for run in r["runs"]] == [0.0, 0.1]
    for i in range(2):
        assert figure(r, f"runs.{i}.reach_all_vs_ideal") >= 1.0  # never faster than the ideal flood
        assert figure(r, f"runs.{i}.pushes_per_peer_per_broadcast") > 0


def test_dht_sim_quick():
    r = run_bench("dht_sim")
    for name in ("clustered_in_region", "plain_in_region", "clustered_global", "plain_global"):
        assert 0 < figure(r, f"{name}.success_rate") <= 1
        assert figure(r, f"{name}.latency_ms_median") >= 0
    assert figure(r, "in_region_latency_ratio") > 0 and figure(r, "global_latency_ratio") > 0


def test_ledger_quick():
    r = run_bench("ledger")
    assert figure(r, "verify_per_s") > 0 and figure(r, "own_append_durable_per_s") > 0
    assert figure(r, "per_reply_vs_verify_alone") > 0
    assert figure(r, "sim.nodes") == 50
    assert figure(r, "standing.1.recompute_s") >= 0 and figure(r, "standing.1.peers") == 1000
    # Sybils reach no more standing than twice the work honest peers received from them (the bound of
    # credits/standing.py), far below the balance their farm shows
    reached, received = figure(r, "sybils.max_group_standing"), figure(r, "sybils.max_group_work_received")
    assert reached <= 2 * received < figure(r, "sybils.max_group_farmed_balance")
    # the spot checks' compute beside the ledger's: both policies measured in the same run
    assert figure(r, "spotcheck_overhead.adaptive.checker_compute_per_token") > 0
    assert figure(r, "spotcheck_overhead.fixed_2pct.checker_compute_per_token") >= 0


def test_spotcheck_quick():
    r = run_bench("spotcheck")
    for name, pair in r["noise"]["tiny"].items():
        assert figure(r, f"noise.tiny.{name}.tolerance") > 0 and pair["over_tolerance"] == 0, (name, pair)
    for name, pair in r["false_accusations"]["tiny"].items():
        assert pair["checked_steps"] >= 200 and pair["false_accusations"] == 0, (name, pair)
    assert r["lies"]["tiny"]["float32/1t vs float32/4t"]["smallest_lie_caught"] <= 0.01  # a 1 % lie is caught
    for rate in ("rate_1", "rate_0.05", "rate_0.01"):
        for policy in ("adaptive_new", "adaptive_trusted", "fixed_2pct"):
            assert r["liars"][rate][policy]["false_accusations"] == 0
    assert r["liars"]["rate_1"]["adaptive_new"]["detection_probability"] == 1.0  # on probation: every step checked
    assert r["liars"]["rate_1"]["adaptive_new"]["output_identical_to_local"] == 1.0
    assert figure(r, "overhead.adaptive.checker_compute_per_token") > 0
    assert figure(r, "overhead.fixed_2pct.checker_compute_per_token") >= 0
    # a slow nearest checker: bounded checks give up on it (twice, then swap it), waiting ones never do;
    # the liar is caught either way
    assert r["slow_checker"]["bounded"]["timeouts"] == 2 and r["slow_checker"]["unbounded"]["timeouts"] == 0
    assert r["slow_checker"]["bounded"]["liar_caught"] and r["slow_checker"]["unbounded"]["liar_caught"]


@pytest.mark.slow
def test_spotcheck_liar_process_quick():
    """The liar as a real `potluck serve` process (bench.liarpeer), new to each client: every generation
    it lied in is caught before the lie is used, and nobody honest is accused."""
    r = run_bench("spotcheck", "--process-generations", "3", "--process-rates", "1", timeout=600)
    run = r["liar_processes"]["rate_1"]
    assert run["generations"] == 3 and run["routed_through_liar"] >= 1 and run["generations_with_a_lie"] >= 1, run
    assert run["detection_probability"] == 1.0 and run["output_identical_to_local"] == 1.0, run
    assert run["false_accusations"] == 0, run


def test_fuzz_quick():
    # a generous per-input bound: on a loaded machine a slow input is not a hang (tests assert no timings)
    r = run_bench("fuzz", "--hang-s", "60", timeout=900)
    assert r["decoder_count"] >= 30 and set(r["decoders"]) >= {
        "p2p.framing.decode", "p2p.tensor.unpack", "p2p.gossip.push", "p2p.membership.hello", "dht.protocol.decode_request",
        "dht.records.SignedValue", "credits.LogEntry.decode", "credits.ForkProof.decode", "credits.replication.heads",
        "pipeline.protocol.step", "pipeline.announce.ServerInfo", "potluck.openai_schema.ChatRequest", "potluck.control",
        "p2p.libp2p.relay.HopMessage", "p2p.swarm_key.decode_key_file", "p2p.identity.key_file"}
    for name, d in r["decoders"].items():
        assert d["inputs"] == r["inputs_per_decoder"] > 0, name
        assert d["rejected"] + d["accepted"] + d["crashes"] == d["inputs"], name
        assert d["rejected"] > 0, name  # every decoder saw inputs it had to refuse
    crashes = {name: d["crash_examples"] for name, d in r["decoders"].items() if d["crashes"]}
    assert r["crashes_total"] == 0, json.dumps(crashes)[:3000]
    assert figure(r, "msgpack_unpack_per_s") > 0 and figure(r, "framing_decode_vs_msgpack") > 0


@pytest.mark.slow
def test_pipeline_quick(smollm2_data):
    data_dir, _ = smollm2_data
    r = run_bench("pipeline", "--data-dir", str(data_dir), timeout=600)
    assert r["servers"] == 2 and r["new_tokens"] == 8
    for mode in ("swarm_direct", "swarm_push"):
        assert figure(r, f"{mode}.tokens_per_s") > 0
        assert r[mode]["tokens_match_local"] is True, r[mode]  # greedy through the swarm = local
    assert figure(r, "ratio_swarm_direct_vs_local_hf") > 0 and figure(r, "ratio_swarm_push_vs_local_hf") > 0
    for key in ("direct_ms", "push_ms", "transport_rtt_ms", "direct_over_transport_rtt", "push_over_transport_rtt"):
        assert figure(r, f"per_hop_overhead.{key}") > 0  # per-token per-hop overhead against the transport's RTT
    assert figure(r, "rss.server_over_full") > 0
    c = r["concurrent"]  # continuous batching: 4 clients at once through the same servers
    assert c["clients"] == 4 and c["tokens_match_local"] is True, c
    assert figure(r, "aggregate_over_single") > 0 and figure(r, "concurrent.per_client_tokens_per_s.min") > 0
    assert figure(r, "concurrent.cpu_ms_per_token.clients") > 0 and len(c["cpu_ms_per_token"]["servers"]) == 2
    assert figure(r, "concurrent.forward_by_batch.tokens_per_s_per_block.8") > 0
    assert figure(r, "speculative_over_plain") > 0 and r["speculative"]["identical"] is True  # prompt lookup = plain
    assert figure(r, "speculative.prompt_lookup.tokens_per_pass") >= 1
    assert 0 <= figure(r, "speculative.prompt_lookup.acceptance") <= 1
    assert figure(r, "local_hf_prompt_lookup.prompt_lookup_over_plain") > 0


@pytest.mark.slow
def test_netns_quick(smollm2_data):
    from netlab import skip_reason

    if reason := skip_reason():
        pytest.skip(reason)
    data_dir, _ = smollm2_data
    r = run_bench("netns", "--data-dir", str(data_dir), timeout=600)
    figure(r, "router.added_rtt_ms_median_over_pairs")
    assert figure(r, "membership_rtt.cross_over_in_region_ratio") > 1  # the lab's regions are farther apart
    assert r["dht_lookup"].get("all_found") is True, r["dht_lookup"]
    assert "tokens_per_s" not in r and "recovery_after_kill" not in r  # --quick leaves these out
    # the far user's restating prompt, plain then with prompt lookup, 120 ms from the replica it uses
    assert figure(r, "speculative.speculative_over_plain") > 0 and r["speculative"]["identical"] is True, r["speculative"]
    for mode in ("plain", "prompt_lookup"):
        assert figure(r, f"speculative.{mode}.tokens_per_s") > 0
        assert figure(r, f"speculative.{mode}.route_rtt_ms") == 120, r["speculative"]
    assert figure(r, "speculative.plain.tokens_per_pass") == 1
    assert figure(r, "speculative.prompt_lookup.tokens_per_pass") >= 1
    assert 0 <= figure(r, "speculative.prompt_lookup.acceptance") <= 1
    # peers behind port-restricted NATs hole punch; behind a symmetric NAT they stay on the relay
    assert figure(r, "hole_punch.direct_over_relayed") > 0 and r["hole_punch"]["symmetric_stays_relayed"] is True, \
        r["hole_punch"]
    by_nat = r["hole_punch"]["by_dialer_nat"]  # towards a peer behind a port-restricted NAT
    assert {k: v["direct"] for k, v in by_nat.items()} == {"port-restricted": True, "endpoint-independent": True,
                                                           "symmetric": False}, by_nat
    # autonat's verdict for a peer started with no NAT flags, behind a NAT and on a public host
    assert figure(r, "hole_punch.reachability.private_detected_s") > 0
    assert figure(r, "hole_punch.reachability.public_detected_s") > 0
    # the same route's generations: a NATed volunteer kept on the relay, then hole punched; the same tokens
    assert figure(r, "hole_punch.relayed_tokens_per_s") > 0 and figure(r, "hole_punch.direct_tokens_per_s") > 0
    assert figure(r, "hole_punch.direct_over_relayed_tokens_per_s") > 0
    assert r["hole_punch"]["relayed_stayed_relayed"] is True and r["hole_punch"]["same_tokens"] is True, r["hole_punch"]


ATTACKS = ("object_bomb", "malformed_frames", "dht_store_flood", "credit_chain_flood", "kv_cache_hog", "unpaid_compute",
           "push_ssrf", "slowloris", "request_flood", "gossip_flood", "presence_sybils", "nested_json",
           "announcement_squatting")


def test_attack_quick():
    r = run_bench("attack", timeout=400)
    assert sorted(r["attacks"]) == sorted(ATTACKS)
    if len(os.sched_getaffinity(0)) >= 2:  # the attacker on a CPU of its own, as on a machine of its own
        iso = r["isolated"]
        assert iso and not set(iso["attacker_cpus"]) & set(iso["victim_and_user_cpus"]), iso
    for name, a in r["attacks"].items():
        assert a["alive"] is True, (name, a)  # the victim stayed up and still answers its control socket
        for point in ("before", "peak", "after"):
            assert figure(r, f"attacks.{name}.rss_mb.{point}") > 0
        figure(r, f"attacks.{name}.rss_growth_mb")
        assert a["honest_during"]["generations"] > 0, (name, a)  # the honest client was generating all along
        assert set(a["goals_met"]) == {"rss_growth", "alive", "honest_success", "latency", "attacker_bounded"}
        # What the attacker got, as the victim reports it, is within the defences' bounds (counts, not timings).
        for what, bound in a["bounds"].items():
            assert a["attacker_obtained"][what] <= bound, (name, what, a["attacker_obtained"][what], bound)
        assert a["goals_met"]["attacker_bounded"] is True, (name, a)
    got = {name: a["attacker_obtained"] for name, a in r["attacks"].items()}
    # the attacks really ran: each sent what it is about
    assert got["object_bomb"]["frames_sent"] >= 1 and got["object_bomb"]["connections_kept"] == 0
    assert got["malformed_frames"]["frames_sent"] >= 10
    assert got["unpaid_compute"]["unreceipted_tokens"] == 0 and got["unpaid_compute"]["sybil_keys"] >= 1
    assert got["push_ssrf"]["pushes_refused"] >= 1 and got["push_ssrf"]["connections_to_named_hosts"] == 0
    assert got["slowloris"]["sockets_opened"] > r["attacks"]["slowloris"]["notes"]["max_unadmitted_per_ip"]
    assert got["request_flood"]["requests_answered"] > 0
    assert got["gossip_flood"]["published"] > got["gossip_flood"]["relayed_by_victim"]  # throttled, not relayed
    assert got["presence_sybils"]["notes_sent"] > got["presence_sybils"]["presence_authors_listed"]  # bounded, not all
    assert got["nested_json"]["requests"] > 0 and got["nested_json"]["answered_other_than_400"] == 0
    # the honest user earned standing at the victim (serving its user) beyond what it consumed there, so
    # even the attacks that keep the victim busy never refuse it for credit
    honest = r["honest_user"]
    assert honest["consumed_at_victim_credits"] < honest["standing_at_victim_credits"], honest
    refused = {name: a["honest_during"]["errors"] for name, a in r["attacks"].items()
               if "402 insufficient_credits" in a["honest_during"].get("errors", {})}
    assert not refused, refused


def test_placement_quick():
    r = run_bench("placement")
    assert [run["volunteers"] for run in r["runs"]] == [20, 40]
    gained = {"joined": 0.0, "rebalanced": 0.0}
    for i, run in enumerate(r["runs"]):
        bound = figure(r, f"runs.{i}.bound")
        for rule in ("before", "after"):
            for stage in ("joined", "rebalanced"):
                assert 0 <= figure(r, f"runs.{i}.{rule}.{stage}.two_replicas") <= bound + 1e-9  # memory's limit
        for stage in ("joined", "rebalanced"):
            after, before = (figure(r, f"runs.{i}.{rule}.{stage}.two_replicas") for rule in ("after", "before"))
            assert after >= before, (i, stage, after, before)
            gained[stage] += after - before
    # the replica rule keeps more blocks doubled than the throughput rule on the same volunteers, as they
    # join (choose_span) and once they have rebalanced (rebalance_span)
    assert gained["joined"] > 0 and gained["rebalanced"] > 0, gained
    # concurrent requests of one peer counted as load spread over more servers, and the slowest of them
    # is no slower than when all take the one best route (the simulation is seeded: no timing here)
    for i in range(len(r["runs"])):
        if "spread" in r["runs"][i]:
            assert figure(r, f"runs.{i}.spread.aware.servers_used") >= figure(r, f"runs.{i}.spread.blind.servers_used")
            assert 0 < figure(r, f"runs.{i}.spread.worst_over_blind") <= 1.0
    assert "spread" in r["runs"][-1]  # 40 volunteers cover the model


def test_model_demand_quick():
    r = run_bench("model_demand")
    assert [run["volunteers"] for run in r["runs"]] == [20, 40]
    for i, run in enumerate(r["runs"]):
        bound = figure(r, f"runs.{i}.bound")
        for rule in ("demand", "proportional", "uniform", "default"):
            assert 0 <= figure(r, f"runs.{i}.{rule}.worst_copies_per_share") <= bound + 1e-9  # no split does better
        assert figure(r, f"runs.{i}.demand.unwanted_chosen") == 0  # nobody serves the model nobody asks for
        # choosing by demand per copy beats choosing by demand alone, on the same volunteers
        assert figure(r, f"runs.{i}.demand.vs_bound") > figure(r, f"runs.{i}.proportional.vs_bound")
    # Sybil keys asking for C: with the caps they weigh one requester (at most one volunteer for C), without, most
    assert figure(r, "sybil.capped.volunteers_on_C") <= 1
    assert figure(r, "sybil.uncapped.volunteers_on_C") > figure(r, "sybil.capped.volunteers_on_C")
