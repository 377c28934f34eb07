"""Standing (credits.standing): each peer's own, Sybil-bounded view of another.

Hand-built work graphs check the rules (Sybils serving each other gain nothing, honest work counts
directly and through one relay, every edge bounds what flows over it); real ledgers check the view a
peer keeps and what `potluck credits` shows; a 1,000-peer swarm with 10 % Sybils reports the standing
Sybil groups reach in honest views against the work honest peers actually received from them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import msgpack
from hypothesis import given, settings, strategies as st
from rich.console import Console

from credits import Ledger, LogEntry, Receipt, StandingView, Store, WorkGraph, linear_pricing, standings
from credits.entry import ZERO_HASH
from p2p.identity import Identity
from potluck.status import render_credits

PRICING = linear_pricing({"m": 1_000_000})
BLOCKS = 30  # every receipt here covers blocks [0, 30): 3e7 FLOPs per token


def key(n: int) -> bytes:
    return bytes([n]) * 32


def graph(edges: dict[tuple[int, int], int]) -> WorkGraph:
    """(server, client) -> FLOPs the server did for the client."""
    return WorkGraph.from_transfers((key(s), key(c), w) for (s, c), w in edges.items())


ME = 0


# --- the rules, on hand-built graphs ---------------------------------------------------------------


def test_a_sybil_pair_serving_each_other_gains_nothing_in_an_honest_view():
    # 1 and 2 are one person's keys: 2 signed for a year of work 1 never did, and the other way round.
    # 3 served me honestly.
    g = graph({(1, 2): 10**18, (2, 1): 10**18, (3, ME): 500})
    view = standings(g, key(ME))
    assert view == {key(3): 500}


def test_a_sybil_clique_that_also_consumed_honest_work_gains_nothing():
    # 4 served the Sybils (real work, they signed for it); the Sybils never served anyone honest.
    g = graph({**{(a, b): 10**17 for a in (1, 2, 3) for b in (1, 2, 3) if a != b},
               (4, 1): 900, (4, ME): 100})
    view = standings(g, key(ME))
    assert all(view.get(key(s), 0) == 0 for s in (1, 2, 3))
    assert view[key(4)] == 100  # what 4 did for me; its work for the Sybils passed nothing on to me


def test_honest_work_counts_directly_and_through_one_relay():
    # 1 served me 1000; 2 served 1 (400) and 3 served 1 (600): 1 received 1000 and passed 1000 on to me.
    g = graph({(1, ME): 1000, (2, 1): 400, (3, 1): 600})
    assert standings(g, key(ME)) == {key(1): 1000, key(2): 400, key(3): 600}
    # 1 passed on only a quarter of what it received: its servers count for a quarter each.
    g = graph({(1, ME): 250, (2, 1): 400, (3, 1): 600})
    assert standings(g, key(ME)) == {key(1): 250, key(2): 100, key(3): 150}


def test_paths_are_at_most_two_edges():
    # 3 → 2 → 1 → me: 3's work reached me only over three edges; it does not count (bounded cost).
    g = graph({(1, ME): 1000, (2, 1): 1000, (3, 2): 1000})
    assert standings(g, key(ME)) == {key(1): 1000, key(2): 1000}


def test_every_edge_bounds_what_flows_over_it():
    # A relay that served me 10 cannot vouch for its servers beyond 10 in total, whatever it signed.
    g = graph({(1, ME): 10, **{(s, 1): 10**15 for s in range(2, 12)}})
    view = standings(g, key(ME))
    assert view[key(1)] == 10
    assert sum(view.get(key(s), 0) for s in range(2, 12)) <= 10
    # Work done for a relay counts at most in full, however much the relay passed on.
    g = graph({(1, ME): 10**15, (2, 1): 7})
    assert standings(g, key(ME))[key(2)] == 7


def test_the_viewer_has_no_standing_in_its_own_view_and_reliability_scales_work():
    g = WorkGraph.from_transfers([(key(1), key(ME), 1000), (key(ME), key(1), 50), (key(2), key(ME), 1000),
                                  (key(1), key(ME), 24)], reliability={key(2): 0.5})
    assert g.received[key(ME)] == {key(1): 1024, key(2): 500}
    assert standings(g, key(ME)) == {key(1): 1024, key(2): 500}


def two_hop_max_flow(g: WorkGraph, source: bytes, sink: bytes) -> int:
    """Max-flow from `source` to `sink` over paths of at most two edges (they share no edge: exact)."""
    into_sink = g.received.get(sink, {})
    flow = into_sink.get(source, 0)
    for relay, worth in into_sink.items():
        if relay != source:
            flow += min(g.received.get(relay, {}).get(source, 0), worth)
    return flow


@dataclass
class Cut:
    """What honest peers near `viewer` received from a group: the bounds of the module docstring."""

    honest_received: int  # W(S): by the viewer and the honest peers that served it
    viewer_received: int  # W_me(S): by the viewer itself


def cut(g: WorkGraph, viewer: bytes, group: set[bytes]) -> Cut:
    near = {viewer} | {a for a, w in g.received.get(viewer, {}).items() if w > 0 and a not in group}
    honest = sum(w for h in near for s, w in g.received.get(h, {}).items() if s in group)
    mine = sum(w for s, w in g.received.get(viewer, {}).items() if s in group)
    return Cut(honest, mine)


edge_lists = st.dictionaries(st.tuples(st.integers(0, 7), st.integers(0, 7)).filter(lambda e: e[0] != e[1]),
                             st.integers(1, 10**6), max_size=30)


@settings(max_examples=300, deadline=None)
@given(edges=edge_lists, sybils=st.sets(st.integers(1, 7), max_size=5))
def test_standing_is_bounded_by_two_hop_max_flow_and_a_groups_cut(edges, sybils):
    g = graph(edges)
    view = standings(g, key(ME))
    for peer, value in view.items():
        assert 0 < value <= two_hop_max_flow(g, peer, key(ME))
    group = {key(s) for s in sybils}
    bound = cut(g, key(ME), group)
    gained = [view.get(s, 0) for s in group]
    assert all(value <= bound.honest_received for value in gained)
    assert sum(gained) <= bound.honest_received + bound.viewer_received


def test_the_store_reads_the_receipts_some_clients_signed_by_the_same_rules():
    store = Store(None, durable=False)
    rng = random.Random(1)
    with store.transaction():
        for n in range(400):  # a few sessions with several counters each, some servers forked
            server, client, session = key(rng.randrange(1, 9)), key(rng.randrange(9, 20)), bytes([n % 7]) * 16
            store.insert_transfer(server, client, session, n, n, rng.randrange(10**6), "m")
        store.put_fork(key(3), 150, b"proof")
    clients = {key(9), key(11), key(12)}
    expected = sorted(t for t in store.counted_transfers() if t[1] in clients)
    assert expected and sorted(store.counted_transfers_to(clients)) == expected
    assert store.counted_transfers_to([]) == []


# --- real ledgers ----------------------------------------------------------------------------------


def identity(name: str) -> Identity:
    return Identity(hashlib.sha256(name.encode()).digest())


def receipt(client: Identity, server: Identity, tokens: int, session: bytes) -> Receipt:
    return Receipt.sign(client, server=server.public_key, model="m", start=0, end=BLOCKS, tokens=tokens,
                        flops=PRICING("m", 0, BLOCKS, tokens), session=session, counter=1)


def earn_chain(server: Identity, receipts: list[Receipt], start_ts: int = 1_000) -> list[bytes]:
    """`server`'s chain of earn entries for `receipts`, encoded."""
    out, prev = [], ZERO_HASH
    for seq, r in enumerate(receipts, start=1):
        entry = LogEntry.create(server, seq, prev, start_ts + seq, "earn", msgpack.packb([r.to_list()]))
        out.append(entry.encode())
        prev = entry.hash
    return out


def flops(tokens: int) -> int:
    return PRICING("m", 0, BLOCKS, tokens)


async def test_a_peer_keeps_its_own_view_and_shows_it_in_its_credit_summary():
    now = [1000.0]
    me, relay, upstream, sybil_a, sybil_b = (identity(n) for n in ("me", "relay", "upstream", "sybil a", "sybil b"))
    led = Ledger(me, Store(None), pricing=PRICING, clock=lambda: now[0])
    view = StandingView(led, max_age=60)
    chains = {relay: earn_chain(relay, [receipt(me, relay, 100, b"s" * 16)]),
              upstream: earn_chain(upstream, [receipt(relay, upstream, 50, b"t" * 16)]),
              # sybil b signs for an hour of work sybil a never did
              sybil_a: earn_chain(sybil_a, [receipt(sybil_b, sybil_a, 3_600_000, b"u" * 16)])}
    for wires in chains.values():
        assert (await led.ingest(wires)).error is None
    balances = await led.balances()
    assert balances[sybil_a.public_key].earned == flops(3_600_000)  # the shared fold credits the farm …
    table = await view.standings()
    assert table == {relay.public_key: flops(100), upstream.public_key: flops(50)}  # … standing does not
    assert await view.standing(sybil_a.public_key) == 0

    # More work arrives: the view keeps its table until `max_age` has passed, then recomputes.
    more = earn_chain(relay, [receipt(me, relay, 100, b"s" * 16), receipt(me, relay, 300, b"v" * 16)])[1:]
    assert (await led.ingest(more)).error is None
    assert await view.standings() is table
    now[0] += 61
    assert await view.standing(relay.public_key) == flops(400)
    assert await view.standing(upstream.public_key) == flops(50)
    unchanged = await view.standings()
    now[0] += 3600
    assert await view.standings() is unchanged  # nothing changed: no recomputation

    summary = await led.summary(standings=await view.standings())
    rows = {row["peer_id"]: row for row in summary["peers"]}
    assert rows[relay.peer_id]["standing"] == flops(400) / 1e9
    assert rows[sybil_a.peer_id]["standing"] == 0 and rows[sybil_a.peer_id]["earned"] == flops(3_600_000) / 1e9
    assert all("standing" not in row for row in (await led.summary())["peers"])

    console = Console(record=True, width=80, color_system=None)
    render_credits(summary, console)
    out = console.export_text()
    assert not [line for line in out.splitlines() if len(line.rstrip()) > 80], out
    assert "standing" in out and f"{flops(400) / 1e9:,.1f}" in out


async def test_the_credit_summary_shows_what_i_earned_and_spent_per_peer_and_my_standing_as_others_see_it():
    me, a, b, c, d = (identity(n) for n in ("me", "a", "b", "c", "d"))
    led = Ledger(me, Store(None), pricing=PRICING)
    view = StandingView(led, max_age=60)
    # I served a (100) and b (300); a served me (40) and d (70); c served b (50) and d served a (20).
    for receipts in ([receipt(a, me, 100, b"1" * 16), receipt(b, me, 300, b"2" * 16)],):
        for r in receipts:
            await led.record_earn(r)
    chains = {a: earn_chain(a, [receipt(me, a, 40, b"3" * 16), receipt(d, a, 70, b"7" * 16)]),
              c: earn_chain(c, [receipt(b, c, 50, b"4" * 16)]),
              d: earn_chain(d, [receipt(a, d, 20, b"5" * 16)])}
    for wires in chains.values():
        assert (await led.ingest(wires)).error is None
    seen_by = await led.read(view.seen_by_sync)
    # in a's view: my 100 directly; in b's view: my 300 directly (c's 50 is c's, not mine)
    assert seen_by == {a.public_key: flops(100), b.public_key: flops(300)}
    summary = await led.summary(standings=await view.standings(), seen_by=seen_by)
    rows = {row["peer_id"]: row for row in summary["peers"]}
    assert (rows[a.peer_id]["earned_from"], rows[a.peer_id]["spent_with"]) == (flops(100) / 1e9, flops(40) / 1e9)
    assert (rows[b.peer_id]["earned_from"], rows[b.peer_id]["spent_with"]) == (flops(300) / 1e9, 0)
    assert (rows[c.peer_id]["earned_from"], rows[c.peer_id]["spent_with"]) == (0, 0)  # nothing between us
    assert rows[a.peer_id]["standing"] == flops(40) / 1e9
    # d's work for a reached me in the share a passed on of all it received (40 of my 100 + d's 20)
    assert rows[d.peer_id]["standing"] == (flops(20) * flops(40) // flops(120)) / 1e9
    assert summary["my_standing"] == {"peers": 2, "min": flops(100) / 1e9, "median": flops(300) / 1e9,
                                      "max": flops(300) / 1e9}
    assert "1e9 FLOPs" in summary["unit"]
    console = Console(record=True, width=80, color_system=None)
    render_credits(summary, console)
    out = console.export_text()
    assert not [line for line in out.splitlines() if len(line.rstrip()) > 80], out
    assert "I earned" in out and "I spent" in out and f"{flops(300) / 1e9:,.1f}" in out
    assert "2 peers I served" in out


# --- 1,000 peers, 10 % Sybils ------------------------------------------------------------------------

HOUR_OF_TOKENS = 3_600_000  # an hour at 1,000 tokens/s


def sybil_swarm(group_size: int, *, peers: int = 1000, sybil_share: float = 0.1, seed: int = 0):
    """Chains of a swarm where honest clients use honest servers, and Sybils, in groups of
    `group_size` keys, claim an hour of work from one another, consume some honest work and do a
    little real work for honest clients. Returns (identities, sybil groups, chains by server)."""
    rng = random.Random(seed)
    people = [identity(f"peer {seed} {i}") for i in range(peers)]
    n_sybils = int(peers * sybil_share)
    honest, sybils = people[n_sybils:], people[:n_sybils]
    groups = [sybils[i:i + group_size] for i in range(0, n_sybils, group_size)]
    earned: dict[Identity, list[Receipt]] = {p: [] for p in people}

    def serve(server: Identity, client: Identity, tokens: int) -> None:
        earned[server].append(receipt(client, server, tokens, rng.randbytes(16)))

    for client in honest:
        for server in rng.sample(honest, 3):
            if server is not client:
                serve(server, client, rng.randint(200, 4000))
    for group in groups:
        for i, member in enumerate(group):
            for j in range(1, min(len(group), 5)):  # each key "served" by up to 4 others of its group
                serve(group[(i + j) % len(group)], member, HOUR_OF_TOKENS)
            serve(rng.choice(honest), member, rng.randint(200, 4000))  # real work the Sybils consumed
        serve(group[0], rng.choice(honest), 1000)  # a little real work for one honest client
    chains = {p: earn_chain(p, rs) for p, rs in earned.items() if rs}
    return honest, groups, chains


def check_sybil_groups(group_size: int) -> None:
    honest, groups, chains = sybil_swarm(group_size)
    # Every honest peer holds the same verified chains; one observer's store stands for all of them.
    observer = Ledger(identity("observer"), Store(None), pricing=PRICING)
    items = list(chains.values())
    for i in range(0, len(items), 64):
        assert all(r.error is None for r in observer.ingest_ranges_sync(items[i:i + 64]))
    g = WorkGraph.from_transfers(observer.store.counted_transfers(), observer.reliability_sync())
    balances = observer.balances_sync()
    honest_keys = {p.public_key for p in honest}
    views = {viewer.public_key: standings(g, viewer.public_key) for viewer in honest}
    worst = {"max_member": 0, "max_group": 0, "received_by_honest": 0, "farmed_balance": 0}
    for group in groups:
        members = {p.public_key for p in group}
        received_by_honest = sum(w for h in honest_keys for s, w in g.received.get(h, {}).items() if s in members)
        worst["received_by_honest"] = max(worst["received_by_honest"], received_by_honest)
        worst["farmed_balance"] = max(worst["farmed_balance"], sum(balances[m].earned for m in members))
        for viewer, view in views.items():
            gained = [view.get(m, 0) for m in members]
            bound = cut(g, viewer, members)
            assert max(gained) <= bound.honest_received <= received_by_honest
            assert sum(gained) <= bound.honest_received + bound.viewer_received
            worst["max_member"] = max(worst["max_member"], max(gained))
            worst["max_group"] = max(worst["max_group"], sum(gained))
    # What the lead quotes: in GFLOP, the most any Sybil (and any group) reached in any honest view,
    # against what honest peers received from a group, and what the farm shows in the shared balances.
    print(f"\nSybil groups of {group_size}: " + ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in worst.items()))
    assert worst["max_group"] <= 2 * worst["received_by_honest"] < worst["farmed_balance"]
    assert all(sum(view.get(h, 0) for h in honest_keys) > 0 for view in views.values())  # honest work counts


def test_sybil_pairs_reach_no_more_than_honest_peers_received_from_them():
    check_sybil_groups(2)


def test_sybil_cliques_of_10_reach_no_more_than_honest_peers_received_from_them():
    check_sybil_groups(10)


def test_a_sybil_clique_of_100_reaches_no_more_than_honest_peers_received_from_it():
    check_sybil_groups(100)


def test_the_benchmark_times_a_recomputation():
    from bench.ledger import bench_standing

    figures = bench_standing(100)
    assert figures["peers"] == 100 and figures["edges"] > 500 and figures["with_standing"] > 0
    assert all(figures[name] >= 0 for name in ("recompute_s", "recompute_balances_known_s", "whole_graph_s",
                                                "one_view_ms"))
