"""Standing: one peer's own view of another, bounded by verified work that reached it.

Balances (`credits.ledger`) are a conserved fold every peer agrees on, and so they are what a
Sybil farms: two keys one person controls sign receipts to each other for work never done, and every
peer's fold credits the "server". Standing is the figure decisions can use instead: personal (each
peer computes it from where *it* stands in the graph) and bounded by work that honest peers, itself
first, actually received.

The work graph. Every counted receipt (`Store.counted_transfers`: the highest counter per
(server, client, session), below a forked server's fork point) is an edge server → client in the
direction the work went, weighted by its worth: FLOPs × the server's reliability in this peer's own
view (`Ledger.reliability_sync`: 0 for a server this peer proved a liar, one that made a false
accusation, or a forked one; else 1) — so a proven liar's work is forfeited here, whatever the fold says. Only the client can sign an edge into
itself, so an edge into an honest peer is work that peer really received.

Standing of X in the view of me (the viewer), over paths of at most two edges (BarterCast's bound,
which keeps the cost at one pass over the edges into me and into the peers that served me):

    standing(X) = w(X→me) + Σ over relays A that served me of  w(X→A) · min(1, w(A→me) / in(A))

where in(A) is all the work A received. Direct work counts in full; work X did for a relay A counts
in the proportion A passed work on to me, so the relays' shares together never exceed what A gave
me: every relay edge A→me carries at most its own worth. Each term is a flow along a path X→me or
X→A→me within the edge's worth, so standing(X) is at most the two-hop max-flow from X to me
(NetFlow/MeritRank family); unlike one max-flow per X, the relayed shares of all X are one feasible
flow, so a relay cannot vouch for any number of identities at full value each.
The direction matters: flow runs from X to me, along the work, so it measures X's work that reached
me (directly, or through a peer that then served me). The reverse flow, me to X, would measure what X
consumed from those near me — which anyone can raise by asking to be served.

What a Sybil group S gains at most, in my view. Let W(S) be the work honest peers within two hops of
me (me and those that served me) received from S: receipts they signed for S's members. Any path
from S to me leaves S over such an edge, so:
- every member of S has standing at most W(S) (the cut between S and the honest side), and work
  S's members did for one another (fake or not) never reaches me: a Sybil pair or clique that only
  serves itself has standing 0;
- S's members have at most W(S) + W_me(S) in total, where W_me(S) ≤ W(S) is the part I received
  myself (a member that served me counts it directly, and relays at most as much again to the
  members that "served" it).
Identities are free, so S gains nothing by splitting into more keys: the bound is the honest work it
did, whatever its size.

What it decides (`credits.admission`, pipeline/billing.py, pipeline/server.py): a busy server's
debt allowance for a client (`debt_limit` + standing), the compute queue's order (highest standing
first) and the larger KV-cache share (standing > 0). The balances stay the shared record.

`StandingView` keeps one peer's standings, recomputed from its ledger at most every `max_age`
seconds (and only when the ledger changed; one recomputation at a time, the others wait for it),
through the ledger's worker, never SQLite on the trio thread. A recomputation reads only the
receipts this peer signed and those its servers signed (through the store's client index), and this
peer's reliability factors (which the ledger computes once per change of its chains or verdicts).
`seen_by` estimates this peer's own standing in the views of the peers it served, from the
same graph as held here (each of them may hold more or less of it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import trio

from .ledger import Ledger


@dataclass
class WorkGraph:
    """Work that reached each peer: `received[client][server]` = worth (FLOPs) of what `server` did for `client`."""

    received: dict[bytes, dict[bytes, int]] = field(default_factory=dict)

    @classmethod
    def from_transfers(cls, transfers: Iterable[tuple[bytes, bytes, int]],
                       reliability: Mapping[bytes, float] | None = None) -> "WorkGraph":
        """From (server, client, flops) rows, each worth flops × the server's reliability (absent: 1.0)."""
        reliability = reliability or {}
        received: dict[bytes, dict[bytes, int]] = defaultdict(lambda: defaultdict(int))
        for server, client, flops in transfers:
            worth = int(flops * reliability.get(server, 1.0))
            if worth > 0 and server != client:
                received[client][server] += worth
        return cls({client: dict(servers) for client, servers in received.items()})

    def edges(self) -> int:
        return sum(len(servers) for servers in self.received.values())


def standings(graph: WorkGraph, viewer: bytes) -> dict[bytes, int]:
    """Every peer with standing > 0 in `viewer`'s view, in FLOPs (see the module docstring); not the viewer."""
    direct = graph.received.get(viewer, {})
    out: dict[bytes, int] = defaultdict(int)
    for server, worth in direct.items():
        out[server] += worth
    for relay, passed_on in direct.items():
        upstream = graph.received.get(relay)
        if not upstream:
            continue
        total = sum(upstream.values())
        for server, worth in upstream.items():
            out[server] += worth if passed_on >= total else worth * passed_on // total
    return {peer: value for peer, value in out.items() if value > 0 and peer != viewer}


class StandingView:
    """One peer's standings of others, from its own ledger; recomputed at most every `max_age` seconds."""

    def __init__(self, ledger: Ledger, *, max_age: float = 60.0):
        self.ledger = ledger
        self.max_age = max_age
        self._computed: tuple[int, float, dict[bytes, int]] | None = None  # (ledger version, clock, standings)
        self._recomputing = trio.Lock()

    def _fresh(self) -> dict[bytes, int] | None:
        if self._computed is None:
            return None
        version, at, table = self._computed
        if version == self.ledger.version or self.ledger.clock() - at < self.max_age:
            return table
        return None

    async def standings(self) -> dict[bytes, int]:
        """public key → standing (FLOPs) of every peer with standing > 0 here."""
        table = self._fresh()
        if table is None:
            async with self._recomputing:
                table = self._fresh()  # another task may have recomputed it meanwhile
                if table is None:
                    table = await self.ledger.read(self.standings_sync)
        return table

    async def standing(self, peer: bytes) -> int:
        return (await self.standings()).get(peer, 0)

    def standings_sync(self) -> dict[bytes, int]:
        """Blocking: recompute now (benchmarks, tools that own the thread)."""
        version, at, me = self.ledger.version, self.ledger.clock(), self.ledger.me
        reliability = self.ledger.reliability_sync()  # this peer's verdicts and forks, once per ledger change
        into_me = self.ledger.store.counted_transfers_to([me])
        relays = {server for server, _client, _flops in into_me}
        graph = WorkGraph.from_transfers(into_me + self.ledger.store.counted_transfers_to(relays), reliability)
        table = standings(graph, me)
        self._computed = (version, at, table)
        return table

    def seen_by_sync(self, limit: int = 64) -> dict[bytes, int]:
        """Blocking: this peer's standing in the view of each of the (at most `limit`, the most served)
        peers it served, computed on the graph this ledger holds around each of them."""
        me = self.ledger.me
        reliability = self.ledger.reliability_sync()
        served: dict[bytes, int] = defaultdict(int)
        for server, client, flops in self.ledger.store.counted_transfers():
            if server == me and client != me:
                served[client] += flops
        out: dict[bytes, int] = {}
        for viewer in sorted(served, key=lambda c: -served[c])[:limit]:
            into = self.ledger.store.counted_transfers_to([viewer])
            relays = {server for server, _client, _flops in into}
            graph = WorkGraph.from_transfers(into + self.ledger.store.counted_transfers_to(relays), reliability)
            out[viewer] = standings(graph, viewer).get(me, 0)
        return out
