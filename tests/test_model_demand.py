"""Demand-driven model choice and model versions: demand notes and their tally (pipeline/demand.py), the
choice rule (pipeline/modelchoice.py), version lineage (pipeline/versions.py), the `supersedes` field
(pipeline/announce.py), and on real processes: a volunteer given two models joins the one asked for."""

from __future__ import annotations

import math

import pytest

from dht.records import InvalidRecord
from p2p.identity import Identity
from pipeline.announce import ServerInfo
from pipeline.demand import MAX_COUNT, MAX_MODELS, DemandBook, DemandNote, InvalidDemandNote
from pipeline.modelchoice import Candidate, choose_model, copies, need
from pipeline.versions import Lineage

A, B = "a" * 64, "b" * 64


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def book(standing: dict[bytes, int] | None = None, **kw) -> tuple[DemandBook, Clock]:
    clock = Clock()

    async def standings():
        return standing or {}

    return DemandBook(Identity.generate().peer_id, standings, clock, **kw), clock


def note(counts: dict[str, int]) -> DemandNote:
    return DemandNote.from_value({"v": 1, "window": 600.0, "counts": counts})


# --- notes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    None, [], {"v": 2, "window": 600.0, "counts": {}}, {"v": 1, "window": 0, "counts": {}},
    {"v": 1, "window": 1e9, "counts": {}}, {"v": 1, "window": True, "counts": {}},
    {"v": 1, "window": 600.0, "counts": []}, {"v": 1, "window": 600.0, "counts": {A: -1}},
    {"v": 1, "window": 600.0, "counts": {A: MAX_COUNT + 1}}, {"v": 1, "window": 600.0, "counts": {A: True}},
    {"v": 1, "window": 600.0, "counts": {A: 1.5}}, {"v": 1, "window": 600.0, "counts": {"x" * 129: 1}},
    {"v": 1, "window": 600.0, "counts": {"": 1}},
    {"v": 1, "window": 600.0, "counts": {f"m{i}": 1 for i in range(MAX_MODELS + 1)}},
])
def test_a_malformed_or_oversized_note_is_refused(value):
    with pytest.raises(InvalidDemandNote):
        DemandNote.from_value(value)


def test_a_note_round_trips():
    n = note({A: 3, B: 0})
    assert DemandNote.from_value(n.to_value()) == n


# --- the tally ----------------------------------------------------------------------------------------------

async def test_own_requests_count_within_the_window_and_are_published_only_when_there_are_some():
    demand, clock = book(window=60.0)
    published = []

    class Gossip:
        async def publish(self, topic, data):
            published.append(data)
            return b""

    assert await demand.publish(Gossip()) is False  # no request seen: nothing to say
    for _ in range(3):
        demand.saw(A)
    clock.t += 30
    demand.saw(B)
    assert await demand.demand() == {A: 3, B: 1}
    assert await demand.publish(Gossip()) is True
    assert DemandNote.from_value(published[0]).counts == {A: 3, B: 1}
    clock.t += 40  # A's requests are older than the window now
    assert demand.own_counts() == {B: 1}


async def test_each_author_counts_up_to_the_cap_and_strangers_together_count_as_one():
    trusted = [Identity.generate() for _ in range(2)]
    demand, clock = book({i.public_key: 10 for i in trusted}, per_author=50)
    for ident in trusted:
        demand.hear(ident.peer_id, note({A: 1000}), clock.t)  # each capped at 50
    for _ in range(100):  # a hundred fresh keys shouting for B
        demand.hear(Identity.generate().peer_id, note({B: 50}), clock.t)
    assert await demand.demand() == {A: 100, B: 50}


async def test_only_the_latest_fresh_note_of_an_author_counts():
    author = Identity.generate()
    demand, clock = book({author.public_key: 1}, note_ttl=100.0)
    assert demand.hear(author.peer_id, note({A: 5}), clock.t)
    assert not demand.hear(author.peer_id, note({A: 50}), clock.t - 1)  # an older note (a replay) loses
    assert demand.hear(author.peer_id, note({A: 7}), clock.t + 1)
    assert await demand.demand() == {A: 7}
    clock.t += 200  # the author stopped publishing: its demand fades
    assert await demand.demand() == {}


async def test_our_own_notes_heard_back_are_not_counted_twice_and_authors_are_bounded():
    demand, clock = book(max_authors=8)
    demand.saw(A)
    assert not demand.hear(demand.me, note({A: 1}), clock.t)
    for _ in range(20):
        demand.hear(Identity.generate().peer_id, note({B: 1}), clock.t)
    assert len(demand._heard) == 8
    assert await demand.demand() == {A: 1, B: 8}


# --- the choice ---------------------------------------------------------------------------------------------

def srv(peer: str, start: int, end: int, *, state: str = "online", supersedes: str | None = None) -> ServerInfo:
    return ServerInfo(peer, start, end, 10.0, 100.0, 1000, state=state, supersedes=supersedes)


def test_copies_counts_blocks_times_replicas_of_online_servers():
    servers = [srv("a", 0, 4), srv("b", 0, 2), srv("c", 2, 4), srv("d", 0, 4, state="offline")]
    assert copies(servers, 4) == 2.0
    assert copies([], 4) == 0.0


def test_the_most_demand_per_copy_wins_and_a_model_nobody_asks_for_is_never_chosen():
    assert choose_model([Candidate(A, 1.0), Candidate(B, 1.0)], {}) is None
    assert choose_model([Candidate(A, 0.0), Candidate(B, 3.0)], {B: 1}) == B  # A is uncovered but unwanted
    assert choose_model([Candidate(A, 1.0), Candidate(B, 3.0)], {A: 10, B: 20}) == A  # 10/1 > 20/3
    assert choose_model([Candidate(A, 1.0), Candidate(B, 1.5)], {A: 10, B: 20}) == B  # 10/1 < 20/1.5
    assert choose_model([Candidate(A, 0.0), Candidate(B, 0.0)], {A: 1, B: 2}) == B  # both uncovered: more demand
    assert need(Candidate(A, 0.0), {A: 1}) == math.inf and need(Candidate(A, 2.0), {}) == 0.0


# --- versions -----------------------------------------------------------------------------------------------

C = "c" * 64


def test_lineage_takes_the_claim_most_servers_make_and_drops_cycles():
    lineage = Lineage.from_claims([(B, A), (B, A), (C, A), (A, B), (A, A)])
    assert lineage.successor == {A: B}  # B's two servers outvote C's; "A supersedes B" would close a cycle
    chain = Lineage.from_claims([(B, A), (C, B)])
    assert chain.newer(A) == [B, C] and chain.older(C) == [B, A] and chain.older(A) == []
    assert chain.family_demand(C, {A: 5, B: 2, C: 1}) == 8 and chain.family_demand(A, {A: 5, B: 2}) == 5


def test_a_request_for_a_family_goes_to_its_newest_complete_version():
    lineage = Lineage.from_claims([(B, A)])
    assert lineage.serving(A, {A, B}.__contains__) == B  # the new version is complete: it serves
    assert lineage.serving(A, {A}.__contains__) == A  # the new one is still filling up: the old serves
    assert lineage.serving(B, {A}.__contains__) == A  # asked for the new one by name, served by the old
    assert lineage.serving(B, set().__contains__) == B  # nothing complete: what was asked for
    assert Lineage().serving(A, {B}.__contains__) == A  # unrelated models are never substituted


def test_a_new_version_inherits_the_old_ones_demand_so_volunteers_with_its_weights_move_over():
    lineage = Lineage.from_claims([(B, A)])
    candidates = [Candidate(A, 2.0), Candidate(B, 0.5)]
    assert choose_model(candidates, {A: 10}) == A  # without the lineage, B is asked for by nobody
    assert choose_model(candidates, {A: 10}, lineage) == B  # 10 / 0.5 copies > 10 / 2 copies
    assert choose_model([Candidate(A, 0.5), Candidate(B, 3.0)], {A: 10}, lineage) == A  # B is well covered


def test_supersedes_is_announced_and_checked():
    info = srv("p", 0, 4, supersedes=A)
    assert ServerInfo.from_value("p", info.to_value()).supersedes == A
    assert ServerInfo.from_value("p", srv("p", 0, 4).to_value()).supersedes is None
    for bad in (5, "x" * 129, ["a"]):
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("p", {**info.to_value(), "supersedes": bad})


# --- real processes -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    """Two tiny random Llamas (different weights, so different ids): [(folder, model id)]."""
    from pipeline.identity import model_id
    from testkit.models import make_tiny

    out = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"model{seed}")
        make_tiny("llama", path, seed=seed)
        out.append((path, model_id(path)))
    return out


@pytest.mark.slow  # three peers, and the volunteer listens ~10 s for demand before each choice
def test_a_volunteer_given_two_models_waits_for_demand_then_serves_the_one_asked_for(spawn, two_models):
    from potluck.localswarm import wait_until

    (a, a_id), (b, b_id) = two_models
    server_a = spawn("--model", str(a), "--blocks", "0:4", "--threads", "1")
    spawn("--model", str(b), "--blocks", "0:4", "--threads", "1", "--bootstrap", server_a.addr)
    volunteer = spawn("--model", str(b), "--model", str(a), "--blocks", "auto", "--threads", "1",
                      "--bootstrap", server_a.addr)

    def choice() -> dict | None:
        return volunteer.status()["model_choice"]

    first = wait_until(choice, 60, 1, message="the volunteer's first model choice")
    assert first["chosen"] is None and volunteer.status()["server"] is None  # nobody asks: nothing loaded
    assert {c["model_id"]: c["copies"] for c in first["candidates"]} == {a_id: 1.0, b_id: 1.0}

    for _ in range(2):  # requests at A's server's own front door: it counts them and gossips the count
        server_a.call("generate", prompt=[1, 2, 3], max_tokens=2)

    served = wait_until(lambda: volunteer.status()["server"], 90, 1, message="the volunteer serves a model")
    assert served["model_id"] == a_id, volunteer.log_tail()
    last = volunteer.status()["model_choice"]
    demand = {c["model_id"]: c["demand"] for c in last["candidates"]}
    assert demand[a_id] >= 1 and demand[b_id] == 0  # the second request may still wait for the next note
