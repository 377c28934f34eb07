"""SmolLM2 served by real `potluck serve --blocks` processes, used by a user's peer process: the tokens
equal a local run, and a server SIGKILLed mid-generation (a replica exists) changes nothing."""

import pytest

from pipeline.loading import load_local_model
from potluck.localswarm import PeerProcess, wait_until
from testkit.processes import kill_the_serving_replica

pytestmark = pytest.mark.slow

PROMPT = "The three primary colors are"
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def model_dir(smollm2_data):
    return smollm2_data[1]


@pytest.fixture(scope="module")
def swarm(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("swarm")
    common = ["--model", str(model_dir), "--threads", "1"]
    procs: dict[str, PeerProcess] = {}
    try:
        procs["head"] = PeerProcess(root / "s0", *common, "--blocks", "0:10").start(timeout=120)
        boot = ["--bootstrap", procs["head"].addr]
        for name, blocks in (("mid-a", "10:20"), ("mid-b", "10:20"), ("tail", "20:30")):
            procs[name] = PeerProcess(root / name, *common, *boot, "--blocks", blocks).start(timeout=120)
        # the fixed 2 % spot checks this module was written with: under the adaptive default every step of
        # a server new to the user is re-run on the other replica, which would then serve a session too
        procs["user"] = PeerProcess(root / "user", *common, *boot, "--spot-check-fraction", "0.02").start(timeout=120)
        servers = [procs[n] for n in ("head", "mid-a", "mid-b", "tail")]
        wait_until(lambda: all(p.call("status")["server"]["start"] is not None for p in servers), 120,
                   message="servers loaded and announced")
        yield procs
    finally:
        for p in procs.values():
            p.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    return load_local_model(model_dir).generate_greedy(ids, NEW_TOKENS, eos_token_id=2)


def test_swarm_of_processes_generates_what_a_local_run_does(swarm, reference):
    user = swarm["user"]
    result = wait_until(lambda: _try_generate(user), 90, 2, message="a generation through the swarm")
    assert result["token_ids"] == reference
    blocks = sorted((hop["start"], hop["end"]) for hop in result["route"])
    assert blocks[0][0] == 0 and blocks[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    status = user.call("status")["last_generation"]
    assert status["tokens"] == len(reference) and status["tokens_per_s"] > 0


def test_credits_after_generation_match_and_agree_everywhere(swarm):
    """A credit moves between machines: servers earned what the user was debited, every peer folds the
    same balances, the total is the grants (none: an open swarm mints nothing). Each route server's
    work is standing in the user's view; the user, who did no work, has none in theirs. A server that
    generates through its own blocks pays the others and earns nothing from itself."""
    user, head = swarm["user"], swarm["head"]
    result = user.call("generate", prompt=PROMPT, max_tokens=8)
    route = {hop["peer_id"] for hop in result["route"]}
    peers = list(swarm.values())

    def views():
        return [{b["peer_id"]: (b["balance"], b["earned"], b["spent"]) for b in p.call("credits")["peers"]}
                for p in peers]

    def settled(payers, earners):
        vs = views()
        spent = [vs[peers.index(p)].get(p.peer_id, (0, 0, 0))[2] for p in payers]
        # every earner is in every view (a spot check's replica may have earned too)
        return vs if all(spent) and all(v == vs[0] for v in vs) and set(vs[0]) >= earners else None

    view = wait_until(lambda: settled([user], route | {user.peer_id}), 60, 1,
                      message="every peer to fold the same balances")[0]
    assert all(view[p][1] > 0 for p in route)  # every server on the route was paid
    assert view[user.peer_id][2] == pytest.approx(sum(v[1] for v in view.values()))  # debited what servers earned
    grants = [p.call("credits")["granted"] for p in peers]
    assert sum(grants) == 0  # nothing minted
    assert sum(v[0] for v in view.values()) == pytest.approx(sum(grants))  # conserved

    mine = {row["peer_id"]: row for row in user.call("credits")["peers"]}
    for server in route:  # the receipts between us, and the work that reached me
        assert view[server][1] > 0 and mine[server]["spent_with"] == pytest.approx(view[server][1])
        assert mine[server]["standing"] == pytest.approx(view[server][1])
    for p in peers:
        if p.peer_id in route:
            theirs = {row["peer_id"]: row for row in p.call("credits")["peers"]}
            assert theirs[user.peer_id]["standing"] == 0
            assert theirs[user.peer_id]["earned_from"] == pytest.approx(view[p.peer_id][1])
            assert p.call("credits")["my_standing"]["peers"] == 1  # it served the user

    # The head generates too: its own blocks run locally and unbilled; it pays the others.
    earned_before = view[head.peer_id][1]
    own = head.call("generate", prompt=PROMPT, max_tokens=8)
    others = {hop["peer_id"] for hop in own["route"]} - {head.peer_id}
    assert head.peer_id in {hop["peer_id"] for hop in own["route"]} and others
    view = wait_until(lambda: settled([user, head], route | others | {user.peer_id, head.peer_id}), 60, 1,
                      message="every peer to fold the head's generation")[0]
    assert view[head.peer_id][1] == pytest.approx(earned_before)  # serving itself earned it nothing
    mine = {row["peer_id"]: row for row in head.call("credits")["peers"]}
    assert mine[head.peer_id]["earned_from"] == mine[head.peer_id]["spent_with"] == 0
    assert mine[head.peer_id]["standing"] is None  # no standing in its own view
    # what it was debited is what it signed to the others: the route's servers, and any replica that
    # checked a step (spot checks) or replaced a failed hop
    assert view[head.peer_id][2] == pytest.approx(sum(row["spent_with"] for row in mine.values()))
    assert all(mine[p]["spent_with"] > 0 for p in others)


def test_server_killed_mid_generation_changes_nothing(swarm, reference):
    user = swarm["user"]
    replicas = [swarm["mid-a"], swarm["mid-b"]]
    # Kill whichever replica the generation is using, once it is under way.
    result, victim, survivor = kill_the_serving_replica(user, replicas, after_s=1.0, poll_s=0.1, timeout=180,
                                                        prompt=PROMPT, max_tokens=NEW_TOKENS)
    assert result["token_ids"] == reference
    assert result["recoveries"] >= 1
    assert any(hop["peer_id"] == survivor.peer_id for hop in result["route"])


def _try_generate(user):
    try:
        return user.call("generate", prompt=PROMPT, max_tokens=NEW_TOKENS)
    except RuntimeError:
        return None  # the user's peer has not yet learned a full route
