"""Speculative decoding (on by default) between real `potluck serve` processes with SmolLM2: on a prompt
that restates its text, the user's peer verifies several tokens a pass and gets exactly the local greedy
tokens; a route server's receipt bills the kept positions, not the rejected drafts; a server SIGKILLed
mid-speculation (a replica exists) changes nothing."""

import pytest

from pipeline.loading import load_local_model
from pipeline.speculative import SpeculativeConfig
from potluck.localswarm import PeerProcess, wait_until
from testkit.processes import kill_the_serving_replica

pytestmark = pytest.mark.slow

PROMPT = ("Copy the text exactly.\nText: The old lighthouse keeper climbed the stairs every night to light the lamp "
          "and watch the ships pass far out at sea.\nCopy: The old lighthouse keeper")
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def model_dir(smollm2_data):
    return smollm2_data[1]


@pytest.fixture(scope="module")
def prompt_ids(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def reference(model_dir, prompt_ids):
    return load_local_model(model_dir).generate_greedy(prompt_ids, NEW_TOKENS, eos_token_id=2)


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-swarm")
    common = ["--model", str(model_dir), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["head"] = PeerProcess(root / "head", *common, "--blocks", "0:15").start(timeout=120)
        boot = ["--bootstrap", procs["head"].addr]
        for name in ("tail-a", "tail-b"):
            procs[name] = PeerProcess(root / name, *common, *boot, "--blocks", "15:30").start(timeout=120)
        procs["user"] = PeerProcess(root / "user", *common, *boot, "--spot-check-fraction", "0.02").start(timeout=120)
        servers = [procs[n] for n in ("head", "tail-a", "tail-b")]
        wait_until(lambda: all(p.call("status")["server"]["start"] is not None for p in servers), 120,
                   message="servers loaded and announced")
        yield procs
    finally:
        for p in procs.values():
            p.close()


def _try_generate(user):
    try:
        return user.call("generate", prompt=PROMPT, max_tokens=NEW_TOKENS, timeout=120)
    except RuntimeError:
        return None  # the user's peer has not yet learned a full route


def test_speculation_gives_the_local_greedy_tokens_and_bills_kept_positions(swarm, reference, prompt_ids):
    result = wait_until(lambda: _try_generate(swarm["user"]), 120, 2, message="a generation through the swarm")
    assert result["token_ids"] == reference
    spec = result["speculation"]
    assert spec["accepted"] > 0 and spec["tokens_per_pass"] > 1.0, spec
    kept = len(prompt_ids) + len(reference) - 1  # positions the servers keep (the last token is never fed)
    route = {(hop["peer_id"], hop["start"], hop["end"]) for hop in result["route"]}
    billed = [r for r in result["paid"] if (r["peer_id"], r["start"], r["end"]) in route]
    assert len(billed) == 2
    for r in billed:  # at most the last pass's rejected drafts on top of the kept positions
        assert kept <= r["tokens"] <= kept + SpeculativeConfig().max_k


def test_server_killed_mid_speculation_changes_nothing(swarm, reference):
    user = swarm["user"]
    replicas = [swarm["tail-a"], swarm["tail-b"]]
    wait_until(lambda: all(p.call("status")["server"]["sessions"] == 0 for p in replicas), 30, 0.2,
               message="earlier sessions closed")
    result, victim, survivor = kill_the_serving_replica(user, replicas, after_s=0.3, poll_s=0.05, timeout=180,
                                                        prompt=PROMPT, max_tokens=NEW_TOKENS)
    assert result["token_ids"] == reference
    assert result["recoveries"] >= 1 and result["speculation"]["accepted"] > 0
    assert any(hop["peer_id"] == survivor.peer_id for hop in result["route"])
