"""Demand-driven model choice and model versions: demand notes and their tally (pipeline/demand.py), the
choice rule (pipeline/modelchoice.py), version lineage (pipeline/versions.py), the `supersedes` field
(pipeline/announce.py), and on real processes: a volunteer given two models joins the one asked for."""

from __future__ import annotations

import math

import pytest
import trio

from dht.records import InvalidRecord
from p2p.identity import Identity
from pipeline.announce import ServerInfo
from pipeline.demand import MAX_COUNT, MAX_MODELS, DemandBook, DemandNote, InvalidDemandNote
from pipeline.modelchoice import Candidate, choose_model, complete, copies, move_to, need, wanted_by_version
from pipeline.versions import Claim, Lineage

A, B, C, D = "a" * 64, "b" * 64, "c" * 64, "d" * 64


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
        await demand.hear(ident.peer_id, note({A: 1000}), clock.t)  # each capped at 50
    for _ in range(100):  # a hundred fresh keys shouting for B
        await demand.hear(Identity.generate().peer_id, note({B: 50}), clock.t)
    assert await demand.demand() == {A: 100, B: 50}


async def test_only_the_latest_fresh_note_of_an_author_counts():
    author = Identity.generate()
    demand, clock = book({author.public_key: 1}, note_ttl=100.0)
    assert await demand.hear(author.peer_id, note({A: 5}), clock.t)
    assert not await demand.hear(author.peer_id, note({A: 50}), clock.t - 1)  # an older note (a replay) loses
    assert await demand.hear(author.peer_id, note({A: 7}), clock.t + 1)
    assert await demand.demand() == {A: 7}
    clock.t += 200  # the author stopped publishing: its demand fades
    assert await demand.demand() == {}


async def test_our_own_notes_heard_back_are_not_counted_twice_and_authors_are_bounded():
    trusted = [Identity.generate() for _ in range(20)]
    demand, clock = book({i.public_key: 1 for i in trusted}, max_trusted=8, max_strangers=4)
    demand.saw(A)
    assert not await demand.hear(demand.me, note({A: 1}), clock.t)
    for ident in trusted:
        await demand.hear(ident.peer_id, note({B: 1}), clock.t)
    for _ in range(20):
        await demand.hear(Identity.generate().peer_id, note({C: 1}), clock.t)
    assert len(demand._trusted) == 8 and len(demand._strangers) == 4
    assert await demand.demand() == {A: 1, B: 8, C: 4}


async def test_a_flood_of_fresh_keys_never_pushes_out_the_notes_of_authors_with_standing():
    trusted = [Identity.generate() for _ in range(3)]
    demand, clock = book({i.public_key: 1 for i in trusted})
    for ident in trusted:
        await demand.hear(ident.peer_id, note({A: 10}), clock.t)
    for _ in range(1024 + 1):  # more fresh keys than the book keeps authors
        await demand.hear(Identity.generate().peer_id, note({B: 64}), clock.t + 1)
    assert await demand.demand() == {A: 30, B: 64}  # the Sybils still weigh one requester


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
    assert need(1, 0.0) == math.inf and need(0, 2.0) == 0.0 and need(6, 2.0) == 3.0


# --- versions -----------------------------------------------------------------------------------------------

def anyone(server: str) -> bool:
    return True


def lineage_of(*claims: tuple[str, str]) -> Lineage:
    """The lineage of (new, old) claims, each by its own vouched server."""
    return Lineage.from_claims([Claim(f"s{i}", new, old) for i, (new, old) in enumerate(claims)], anyone)


def test_lineage_takes_the_claim_most_servers_make_and_drops_cycles():
    lineage = lineage_of((B, A), (B, A), (C, A), (A, B), (A, A))
    assert lineage.successor == {A: B}  # B's two servers outvote C's; "A supersedes B" would close a cycle
    chain = lineage_of((B, A), (C, B))
    assert chain.newer(A) == [B, C] and chain.older(C) == [B, A] and chain.older(A) == []


def test_a_strangers_supersedes_claim_moves_no_demand():
    vouched = {"s1", "s2"}.__contains__
    sybil = Lineage.from_claims([Claim("x", C, A)], vouched)  # a fresh key serving C "supersedes A"
    assert sybil.successor == {}
    assert wanted_by_version({A: 10}, sybil, {A}.__contains__) == {A: 10}  # C is wanted by nobody
    # a vouched server's claim moves demand to the new version while it fills up
    real = Lineage.from_claims([Claim("s1", B, A), Claim("x", C, A), Claim("y", C, A)], vouched)
    assert real.successor == {A: B}  # two strangers do not outvote one vouched server
    assert wanted_by_version({A: 10}, real, {A}.__contains__) == {A: 10, B: 10}


def test_claims_are_votes_of_distinct_servers_and_a_weaker_claim_cannot_cancel_a_stronger_one():
    # one server announcing the same claim thrice counts once
    lineage = Lineage.from_claims([Claim("s1", B, A)] * 3 + [Claim("s2", C, A), Claim("s3", C, A)], anyone)
    assert lineage.successor == {A: C}
    # a server naming two successors of one version counts for neither
    lineage = Lineage.from_claims([Claim("s1", C, A), Claim("s2", C, A), Claim("s3", B, A), Claim("s4", B, A),
                                   Claim("s4", D, A)], anyone)
    assert lineage.successor == {A: C}  # C: s1, s2; B: s3 (ties would go to B)
    # "C supersedes A" by one server would close a cycle with "A supersedes C" by two: the two win
    lineage = Lineage.from_claims([Claim("s1", C, A), Claim("s2", A, C), Claim("s3", A, C)], anyone)
    assert lineage.successor == {C: A}


def test_a_request_for_a_family_goes_to_its_newest_complete_version():
    lineage = lineage_of((B, A))
    assert lineage.serving(A, {A, B}.__contains__) == B  # the new version is complete: it serves
    assert lineage.serving(A, {A}.__contains__) == A  # the new one is still filling up: the old serves
    assert lineage.serving(B, {A}.__contains__) == A  # asked for the new one by name, served by the old
    assert lineage.serving(B, set().__contains__) == B  # nothing complete: what was asked for
    assert Lineage().serving(A, {B}.__contains__) == A  # unrelated models are never substituted


def test_a_new_version_is_wanted_for_the_old_ones_requests_so_volunteers_with_its_weights_move_over():
    lineage = lineage_of((B, A))
    demand = {A: 10}
    # the new version is still filling up: the old one serves the requests, the new one is wanted for them too
    wanted = wanted_by_version(demand, lineage, {A}.__contains__)
    assert wanted == {A: 10, B: 10}
    assert choose_model([Candidate(A, 2.0), Candidate(B, 0.5)], {A: 10}) == A  # blind to versions: B is unasked
    assert choose_model([Candidate(A, 2.0), Candidate(B, 0.5)], wanted) == B  # 10 / 0.5 copies > 10 / 2 copies
    assert choose_model([Candidate(A, 0.5), Candidate(B, 3.0)], wanted) == A  # B is well covered already
    # once the new version is complete it serves the requests: the old one is wanted by nobody
    assert wanted_by_version(demand, lineage, {A, B}.__contains__) == {B: 10}
    assert wanted_by_version({B: 3}, Lineage(), {A}.__contains__) == {B: 3}  # no lineage: nothing shared


def test_complete_means_every_block_announced_by_an_online_server():
    assert complete([srv("a", 0, 2), srv("b", 2, 4)], 4)
    assert not complete([srv("a", 0, 2), srv("b", 2, 4, state="offline")], 4)
    assert not complete([], 4)


def test_a_server_moves_only_when_that_lowers_the_larger_need_and_never_leaves_a_model_it_alone_covers():
    def share(m: str) -> float:
        return 1.0

    # a new version short of servers, the old one well covered: move
    assert move_to(Candidate(A, 3.0), 1.0, [Candidate(A, 3.0), Candidate(B, 0.5)], {A: 10, B: 10}, share) == B
    # we are the old version's only copy and it still serves requests: stay (its need would be infinite)
    assert move_to(Candidate(A, 1.0), 1.0, [Candidate(A, 1.0), Candidate(B, 0.0)], {A: 10, B: 10}, share) is None
    # the new version is complete and serves every request: the old version's servers move
    assert move_to(Candidate(A, 2.0), 1.0, [Candidate(A, 2.0), Candidate(B, 1.0)], {B: 10}, share) == B
    # balanced within the margin: stay (no back and forth)
    assert move_to(Candidate(A, 2.0), 1.0, [Candidate(A, 2.0), Candidate(B, 2.0)], {A: 10, B: 11}, share) is None
    # nobody asks for anything: stay
    assert move_to(Candidate(A, 2.0), 1.0, [Candidate(A, 2.0), Candidate(B, 0.0)], {}, share) is None


def test_moves_one_server_at_a_time_settle_without_cycles():
    wanted = {A: 30, B: 10}
    swarm = {A: 0.0, B: 0.0}
    serving = [A if i % 2 else B for i in range(8)]  # 8 one-copy servers split evenly to start
    for m in serving:
        swarm[m] += 1.0
    moves = 0
    for _ in range(10):
        moved = False
        for i, m in enumerate(serving):
            target = move_to(Candidate(m, swarm[m]), 1.0, [Candidate(x, swarm[x]) for x in (A, B)], wanted,
                             lambda x: 1.0)
            if target is not None:
                swarm[m] -= 1.0
                swarm[target] += 1.0
                serving[i] = target
                moved, moves = True, moves + 1
        if not moved:
            break
    assert not moved and moves == 2 and swarm == {A: 6.0, B: 2.0}  # 30/6 = 10/2: demand per copy even


def test_supersedes_is_announced_and_checked():
    info = srv("p", 0, 4, supersedes=A)
    assert ServerInfo.from_value("p", info.to_value()).supersedes == A
    assert ServerInfo.from_value("p", srv("p", 0, 4).to_value()).supersedes is None
    for bad in (5, "x" * 129, ["a"]):
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("p", {**info.to_value(), "supersedes": bad})


# --- a move: the client half follows the served model ------------------------------------------------------

@pytest.mark.slow  # two servers start in turn (each loads and measures its blocks): ~30 s here
async def test_after_a_move_the_peer_generates_with_the_model_it_serves_now(three_models, tmp_path):
    from credits import Ledger
    from pipeline.pricing import ModelPricing
    from potluck.peer import ModelOption, Peer, PeerConfig, _serve_by_demand
    from testkit.swarms import HERE, swarm

    (a, a_id), (b, b_id), _ = three_models
    options = [ModelOption(str(a), a, a_id, 4), ModelOption(str(b), b, b_id, 4)]
    move = trio.Event()

    async def choose_model():
        return options[0]

    async def better_model(serving, blocks):
        if serving is options[1]:
            await trio.sleep_forever()
        await move.wait()
        return options[1]

    with trio.fail_after(120):
        async with swarm("sim", a, [], model_id=a_id) as s, trio.open_nursery() as nursery:
            node = s.world.add_node(place=HERE)
            peer = Peer(PeerConfig(data_dir=tmp_path, model=str(a), blocks="0:4", model_candidates=[str(a), str(b)],
                                   bootstrap=list(s.bootstrap)),
                        node.identity, node, Ledger.open(node.identity, tmp_path, pricing=ModelPricing()))
            peer.choose_model, peer.better_model = choose_model, better_model  # type: ignore[method-assign]
            await nursery.start(peer.dht.run)
            await nursery.start(peer.gossip.run)
            nursery.start_soon(_serve_by_demand, peer)
            while peer.server is None:
                await trio.sleep(0.05)
            old = await peer.client()  # waits for A's server to be up
            old_server = peer.server
            assert old.model_id == a_id and old.local_server is old_server
            assert (await peer.model_card())["model_id"] == a_id

            move.set()
            while peer.server is old_server or peer.server is None:
                await trio.sleep(0.05)
            new = await peer.client()  # waits for B's server to be up, then is built for B
            assert old_server.stopping
            assert new.model_id == b_id and new.local_server is peer.server and peer.server.model_id == b_id
            assert (await peer.model_card())["model_id"] == b_id
            nursery.cancel_scope.cancel()


# --- real processes -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    """Three tiny random Llamas (different weights, so different ids): [(folder, model id)]."""
    from pipeline.identity import model_id
    from testkit.models import make_tiny

    out = []
    for seed in (1, 2, 3):
        path = tmp_path_factory.mktemp(f"model{seed}")
        make_tiny("llama", path, seed=seed)
        out.append((path, model_id(path)))
    return out


@pytest.mark.slow  # three peers, and the volunteer listens ~10 s for demand before each choice
def test_a_volunteer_given_two_models_waits_for_demand_then_serves_the_one_asked_for(spawn, three_models):
    from potluck.localswarm import wait_until

    (a, a_id), (b, b_id), _ = three_models
    server_a = spawn("--model", str(a), "--blocks", "0:4", "--threads", "1")
    spawn("--model", str(b), "--blocks", "0:4", "--threads", "1", "--bootstrap", server_a.addr)
    volunteer = spawn("--model", str(b), "--model", str(a), "--blocks", "auto", "--threads", "1",
                      "--bootstrap", server_a.addr)

    def choice() -> dict | None:
        return volunteer.status()["model_choice"]

    first = wait_until(choice, 60, 1, message="the volunteer's first model choice")
    assert first["serving"] is None and volunteer.status()["server"] is None  # nobody asks: nothing loaded
    assert {c["model_id"]: c["copies"] for c in first["candidates"]} == {a_id: 1.0, b_id: 1.0}

    for _ in range(2):  # requests at A's server's own front door: it counts them and gossips the count
        server_a.call("generate", prompt=[1, 2, 3], max_tokens=2)

    served = wait_until(lambda: volunteer.status()["server"], 90, 1, message="the volunteer serves a model")
    assert served["model_id"] == a_id, volunteer.log_tail()
    last = volunteer.status()["model_choice"]
    demand = {c["model_id"]: c["demand"] for c in last["candidates"]}
    assert demand[a_id] >= 1 and demand[b_id] == 0  # the second request may still wait for the next note


@pytest.mark.slow  # three peers, and the volunteer listens ~10 s for demand before its choice
def test_a_volunteer_holding_a_new_versions_weights_completes_it_while_the_old_one_is_asked_for(spawn, three_models):
    from potluck.localswarm import wait_until

    (old, old_id), _, (new, new_id) = three_models
    server_old = spawn("--model", str(old), "--blocks", "0:4", "--threads", "1")
    server_new = spawn("--model", str(new), "--blocks", "0:2", "--supersedes", old_id, "--threads", "1",
                       "--bootstrap", server_old.addr)
    assert wait_until(lambda: server_new.status()["server"], 60, 1, message="the new version's first server")
    server_old.call("generate", prompt=[1, 2, 3], max_tokens=2)  # the old version is asked for, and serves
    volunteer = spawn("--model", str(old), "--model", str(new), "--blocks", "auto", "--threads", "1",
                      "--bootstrap", server_old.addr)

    served = wait_until(lambda: volunteer.status()["server"], 90, 1, message="the volunteer serves a model")
    # the old version has one copy and serves the requests; the new one, half a copy, is wanted for them too
    assert served["model_id"] == new_id, volunteer.log_tail()
    assert served["start"] <= 2 and served["end"] == 4  # with the blocks the new version lacked: complete now
    wanted = {c["model_id"]: c["demand"] for c in volunteer.status()["model_choice"]["candidates"]}
    assert wanted[old_id] >= 1 and wanted[new_id] == wanted[old_id]
