"""Requests routed by model family (issue #17): a request for any version of a family runs on the newest
complete version the peer holds the folder of (potluck/generation.py `find_model`, `choose_version`,
pipeline/versions.py `Lineage.preference`), and the answer names the id that served; on real processes,
the old version serves until the new one is complete, then the new one does — for users holding its
folder, while a server and a user holding only the old folder keep serving and using the old one."""

from __future__ import annotations

import httpx
import pytest

from pipeline.versions import Claim, Lineage
from potluck.generation import choose_version, find_model, resolve
from potluck.openai_schema import ApiError

A, B, C, X = "a" * 64, "b" * 64, "c" * 64, "d" * 64


def card(model_id: str, name: str, *, here: bool, complete: bool | None, superseded_by: str | None = None) -> dict:
    coverage = None if complete is None else {"complete": complete, "missing": [] if complete else [[2, 4]],
                                              "num_blocks": 4}
    return {"name": name, "model_id": model_id, "num_blocks": 4, "context_length": 64, "runs_here": here,
            "coverage": coverage, "supersedes": [], "superseded_by": superseded_by}


def test_preference_is_newest_first_then_older_nearest_first():
    chain = Lineage.from_claims([Claim("s1", B, A), Claim("s2", C, B)], lambda server: True)
    assert chain.preference(B) == [C, B, A]
    assert chain.preference(A) == [C, B, A]
    assert Lineage().preference(A) == [A]


def test_a_request_for_the_old_version_runs_on_the_new_one_once_it_is_complete():
    old, new = card(A, "tiny", here=True, complete=True, superseded_by=B), card(B, "tiny-v2", here=True, complete=False)
    assert choose_version([old, new], A) is old  # the new version is still filling up: the old one serves
    assert choose_version([old, new], B) is old  # asked for the new one by its id: served by the old one
    new_complete = {**new, "coverage": {"complete": True, "missing": []}}
    assert choose_version([old, new_complete], A) is new_complete
    assert choose_version([old, new_complete], B) is new_complete


def test_only_versions_this_peer_holds_the_folder_of_serve():
    old, new = card(A, "tiny", here=True, complete=True, superseded_by=B), card(B, "tiny-v2", here=False, complete=True)
    assert choose_version([old, new], A) is old  # the new version is complete, but this peer cannot run it
    assert choose_version([old, new], B) is old  # asked for the new version: its old one here serves
    assert choose_version([new], B) is None  # no version of it here
    unrelated = card(X, "other", here=True, complete=True)
    assert choose_version([unrelated, new], B) is None  # an unrelated model is never substituted


def test_with_no_version_complete_the_one_asked_for_answers_with_its_missing_blocks():
    old = card(A, "tiny", here=True, complete=False, superseded_by=B)
    new = card(B, "tiny-v2", here=True, complete=None)  # unknown coverage is not complete
    assert choose_version([old, new], A) is old
    assert choose_version([old, new], B) is new
    assert choose_version([old, {**new, "runs_here": False}], B) is old  # nearest version here


def test_find_model_by_name_id_prefix_or_default_prefers_this_peers_models():
    here, there = card(A, "tiny", here=True, complete=True), card(B, "tiny", here=False, complete=True)
    models = [there, here]
    assert find_model(models, "default") is here
    assert find_model(models, " TINY ") is here  # a name two models share: the one this peer runs
    assert find_model(models, B) is there and find_model(models, B[:8]) is there
    assert find_model(models, B[:7]) is None  # too short a prefix
    assert find_model(models, "nothing") is None


class _Peer:
    """What `resolve` reads of a peer: its `swarm_models`."""

    def __init__(self, models: list[dict]):
        self.models = models

    async def swarm_models(self, load: bool = False, timeout: float = 5.0, max_age: float = 2.0) -> list[dict]:
        return self.models


async def test_resolve_routes_a_family_name_and_refuses_a_model_without_a_version_here():
    old, new = card(A, "tiny", here=True, complete=True, superseded_by=B), card(B, "tiny-v2", here=True, complete=True)
    assert await resolve(_Peer([old, new]), "tiny") is new  # the family's old name
    assert await resolve(_Peer([old, new]), "default") is new
    with pytest.raises(ApiError) as refused:
        await resolve(_Peer([old, card(X, "other", here=False, complete=True)]), "other")
    assert refused.value.status == 404 and refused.value.code == "model_not_found"


# --- real processes -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """Two tiny random Llamas of one architecture (different seeds, so different ids): [(folder, model id)]."""
    from pipeline.identity import model_id
    from testkit.models import make_tiny

    out = []
    for version in (1, 2):
        path = tmp_path_factory.mktemp(f"tiny-v{version}")
        make_tiny("llama", path, seed=version)
        out.append((path, model_id(path)))
    return out


@pytest.mark.slow  # four peers
def test_the_old_version_serves_until_the_new_one_is_complete_then_the_new_one_does(spawn, two_versions):
    from potluck.localswarm import wait_until

    (old, old_id), (new, new_id) = two_versions
    server_old = spawn("--model", str(old), "--blocks", "0:4", "--threads", "1")
    new_first = spawn("--model", str(new), "--blocks", "0:2", "--supersedes", old_id, "--threads", "1",
                      "--bootstrap", server_old.addr)
    user = spawn("--model", str(old), "--model", str(new), "--threads", "1", "--api", "127.0.0.1:0",
                 "--bootstrap", server_old.addr)
    assert wait_until(lambda: new_first.status()["server"], 60, 1, message="the new version's first server")

    def ask(model: str) -> dict:
        return user.call("generate", model=model, prompt=[1, 2, 3], max_tokens=2)

    def listed() -> dict[str, dict] | None:
        models = {m["model_id"]: m for m in user.call("status", models=True)["models"]}
        return models if new_id in models and models[new_id]["supersedes"] == [old_id] else None

    assert ask(old_id)["model_id"] == old_id, user.log_tail()  # loads the user's versions
    models = wait_until(listed, 60, 1, message="the user's peer sees what the new version supersedes")
    assert models[old_id]["superseded_by"] == new_id and models[old_id]["runs_here"] and models[new_id]["runs_here"]
    assert not models[new_id]["coverage"]["complete"]
    for asked in (old_id, new_id, old.name):  # the new version is incomplete: the old one serves each request
        served = ask(asked)
        assert served["model_id"] == old_id and served["tokens"] == 2, user.log_tail()

    new_second = spawn("--model", str(new), "--blocks", "2:4", "--supersedes", old_id, "--threads", "1",
                       "--bootstrap", server_old.addr)
    served = wait_until(lambda: (lambda r: r if r["model_id"] == new_id else None)(ask(old.name)), 60, 1,
                        message="a request for the old version served by the completed new one")
    new_servers = {new_first.status()["peer_id"], new_second.status()["peer_id"]}
    assert {hop["peer_id"] for hop in served["route"]} == new_servers and served["tokens"] == 2
    assert ask(old_id)["model_id"] == new_id, user.log_tail()

    # the same through the HTTP API: the answer names the version that served; /v1/models, the relations
    api = user.call("status")["api"]
    answer = httpx.post(api + "/v1/completions", json={"model": old_id, "prompt": [1, 2, 3], "max_tokens": 2},
                        timeout=60)
    assert answer.status_code == 200, answer.text
    assert answer.json()["potluck"]["model_id"] == new_id and answer.json()["model"] == new.name
    listing = {m["root"]: m["potluck"] for m in httpx.get(api + "/v1/models", timeout=60).json()["data"]}
    assert listing[old_id]["superseded_by"] == new_id and listing[new_id]["supersedes"] == [old_id]


@pytest.mark.slow  # four peers
def test_a_server_holding_only_the_old_version_keeps_serving_it_after_the_new_one_is_complete(spawn, two_versions):
    """The new version complete in the swarm does not retire the old one: its server (only the old folder)
    keeps announcing and serving, a user holding only the old folder is answered by it — asked by id or
    by name — while a user holding both folders moves to the new version."""
    from potluck.localswarm import wait_until

    (old, old_id), (new, new_id) = two_versions
    server_old = spawn("--model", str(old), "--blocks", "0:4", "--threads", "1")
    boot = ["--threads", "1", "--bootstrap", server_old.addr]
    server_new = spawn("--model", str(new), "--blocks", "0:4", "--supersedes", old_id, *boot)
    user_old = spawn("--model", str(old), *boot)
    user_both = spawn("--model", str(old), "--model", str(new), *boot)

    def ask(user, model: str) -> dict:
        return user.call("generate", model=model, prompt=[1, 2, 3], max_tokens=2)

    def served_by_new() -> dict | None:
        try:
            answer = ask(user_both, old_id)
        except RuntimeError:
            return None  # the user's peer has not taken up its versions yet
        return answer if answer["model_id"] == new_id else None

    moved = wait_until(served_by_new, 90, 1, message="the user holding both folders served by the new version")
    assert [hop["peer_id"] for hop in moved["route"]] == [server_new.peer_id] and moved["tokens"] == 2
    models = {m["model_id"]: m for m in user_both.call("status", models=True)["models"]}
    assert models[old_id]["superseded_by"] == new_id and models[new_id]["coverage"]["complete"]

    for asked in (old_id, old.name):  # by id and by name: the old version, from the server that kept it
        served = ask(user_old, asked)
        assert served["model_id"] == old_id and served["tokens"] == 2, user_old.log_tail()
        assert [hop["peer_id"] for hop in served["route"]] == [server_old.peer_id]
    # the old server still announces its blocks: the swarm's view of the old version is complete through it
    models = {m["model_id"]: m for m in user_both.call("status", models=True)["models"]}
    assert models[old_id]["coverage"]["complete"], models[old_id]
    assert server_old.call("status")["server"]["sessions_opened"] >= 2
    assert ask(user_both, old.name)["model_id"] == new_id  # and the user holding both stays on the new one


def test_potluck_status_shows_the_supersedes_relations():
    from rich.console import Console

    from potluck.status import render_status

    status = {"peer_id": "me", "region": "", "addrs": [], "dht": {"clusters": {}}, "api": None, "server": None,
              "last_generation": None, "peers": [],
              "models": [{**card(A, "tiny", here=True, complete=None, superseded_by=B)},
                         {**card(B, "tiny-v2", here=False, complete=None), "supersedes": [A]}]}
    console = Console(record=True, width=100, color_system=None)
    render_status(status, console)
    out = console.export_text()
    assert f"superseded by {B[:12]}" in out and f"supersedes {A[:12]}" in out, out
