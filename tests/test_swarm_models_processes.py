"""A peer that loaded no model (the bootstrap peer, a relay, a user before its first request) still
shows which models the swarm serves, who serves which blocks, and the coverage: real processes."""

import os
import subprocess

import pytest

from potluck.localswarm import POTLUCK, PeerProcess, wait_until
from potluck.status import short_id

pytestmark = pytest.mark.slow  # three `potluck serve` processes, two of them loading SmolLM2


@pytest.fixture
def swarm(smollm2_data, tmp_path):
    """(bootstrap peer with no model, server of blocks 0:15, server of blocks 15:30)."""
    procs: list[PeerProcess] = []
    try:
        boot = PeerProcess(tmp_path / "boot").start()
        procs.append(boot)
        common = ["--model", str(smollm2_data[1]), "--threads", "1", "--bootstrap", boot.addr]
        for blocks in ("0:15", "15:30"):
            procs.append(PeerProcess(tmp_path / f"blocks{blocks.replace(':', '-')}", *common, "--blocks", blocks)
                         .start(timeout=120))
        yield procs
    finally:
        for p in procs:
            p.close()


def test_bootstrap_peer_status_shows_the_swarms_model_servers_and_coverage(swarm):
    boot, head, tail = swarm

    def covered() -> list[dict] | None:
        models = boot.status().get("models") or []
        return models if models and (models[0]["coverage"] or {}).get("complete") else None

    (model,) = wait_until(covered, 90, 1, message="the bootstrap peer sees the model covered")
    assert model["name"] == "SmolLM2-135M-Instruct" and model["num_blocks"] == 30 and model["runs_here"] is False
    assert model["context_length"] == 8192  # as the servers announced it, from the model's config
    assert model["coverage"]["covered_blocks"] == 30 and model["coverage"]["missing"] == []
    assert [(s["peer_id"], s["start"], s["end"]) for s in model["coverage"]["servers"]] == [
        (head.peer_id, 0, 15), (tail.peer_id, 15, 30)]
    assert boot.status()["server"] is None  # it lists the model without loading it

    out = subprocess.run([*POTLUCK, "status", "--data-dir", str(boot.data_dir)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, check=True, timeout=60).stdout
    assert all(len(line) <= 80 for line in out.splitlines()), out
    assert "SmolLM2-135M-Instruct" in out and "30/30 blocks covered" in out, out
    assert "no model seen yet" not in out
    for server, blocks in ((head, "0:15"), (tail, "15:30")):
        rows = [line for line in out.splitlines() if line.startswith(short_id(server.peer_id))]
        assert len(rows) == 2 and all(blocks in row for row in rows), out  # known peers' "serves", the model's servers
