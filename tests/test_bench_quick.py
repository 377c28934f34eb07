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
    assert figure(r, "rss.server_over_full") > 0


@pytest.mark.slow
def test_netns_quick():
    from netlab import skip_reason

    if reason := skip_reason():
        pytest.skip(reason)
    r = run_bench("netns", timeout=600)
    figure(r, "router.added_rtt_ms_median_over_pairs")
    assert figure(r, "membership_rtt.cross_over_in_region_ratio") > 1  # the lab's regions are farther apart
    assert r["dht_lookup"].get("all_found") is True, r["dht_lookup"]
    assert "tokens_per_s" not in r and "recovery_after_kill" not in r  # --quick leaves the model out
