"""Admission by standing (credits.admission): what a busy server lets a client owe it, on real ledgers.

A newcomer may owe a busy server `debt_limit` and no more (free when idle); work a client did that
reached the server raises its allowance, a farmed balance does not; and self-dealing — an attacker's
server and 1, 10 or 100 Sybil clients signing an hour of work for one another — gains zero standing
in every honest peer's view while honest work between honest peers keeps its full standing.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest

from credits import (
    Admission, CreditPolicy, CreditRefused, InvalidReceipt, Ledger, ReceiptSigner, StandingView, Store, WorkGraph,
    linear_pricing, standings,
)
from p2p.identity import Identity

PRICING = linear_pricing({"m": 1_000_000})
BLOCKS = 30  # every receipt covers blocks [0, 30): 3e7 FLOPs per token


def flops(tokens: int) -> int:
    return PRICING("m", 0, BLOCKS, tokens)


class Swarm:
    """Real ledgers on one simulated clock; `serve` signs and records a cumulative receipt, `replicate`
    gives every ledger every chain (as gossip would)."""

    def __init__(self, policy: CreditPolicy = CreditPolicy()):
        self.now = 1_000.0
        self.policy = policy
        self.ledgers: list[Ledger] = []
        self.signers: dict[tuple[bytes, bytes], ReceiptSigner] = {}

    def peer(self, name: str) -> Ledger:
        led = Ledger(Identity(hashlib.sha256(name.encode()).digest()), Store(None), pricing=PRICING,
                     policy=self.policy, clock=lambda: self.now)
        self.ledgers.append(led)
        return led

    def sign(self, client: Ledger, server: Ledger, tokens: int):
        """The client signs for `tokens` more of the server's work (in one session per pair)."""
        key = (client.me, server.me)
        if key not in self.signers:
            self.signers[key] = ReceiptSigner(client.identity, server=server.me, model="m", start=0, end=BLOCKS,
                                              pricing=PRICING)
        signer = self.signers[key]
        return signer.sign(signer.tokens + tokens)

    def serve(self, server: Ledger, client: Ledger, tokens: int) -> None:
        server.append_sync("earn", _earn_body(self.sign(client, server, tokens)))

    def replicate(self, viewers: list[Ledger] | None = None) -> None:
        """Every chain into each of `viewers` (default: every ledger)."""
        for viewer in self.ledgers if viewers is None else viewers:
            ranges = [author.store.range_wire(author.me, viewer.heads.get(author.me, (0,))[0] + 1, 10**9)
                      for author in self.ledgers if author is not viewer]
            for i in range(0, len(ranges), 64):
                assert all(r.error is None for r in viewer.ingest_ranges_sync(ranges[i:i + 64]))


def _earn_body(receipt) -> bytes:
    return msgpack.packb([receipt.to_list()], use_bin_type=True)


def test_open_swarms_mint_nothing_by_default():
    assert CreditPolicy().starting_grant == 0
    assert CreditPolicy().debt_limit > 0  # newcomers are still served: by idle servers, and within this


async def test_a_busy_server_lets_a_newcomer_owe_its_allowance_and_no_more():
    swarm = Swarm(CreditPolicy(debt_limit=flops(100)))
    server, newcomer = swarm.peer("server"), swarm.peer("newcomer")
    admission = Admission(server, StandingView(server, max_age=0))
    assert await newcomer.claim_starting_grant() is None  # nothing to claim
    fresh = await admission.admit(newcomer.me, idle=False)
    assert (fresh.standing, fresh.owed, fresh.allowance) == (0, 0, flops(100))
    admission.check(fresh, unsettled=flops(100))  # up to the allowance ...
    with pytest.raises(CreditRefused):
        admission.check(fresh, unsettled=flops(101))  # ... and not a FLOP more
    swarm.serve(server, newcomer, 100)  # the server did 100 tokens for it: it owes them now
    owing = await admission.admit(newcomer.me, idle=False)
    assert owing.owed == flops(100) and owing.headroom() == 0
    with pytest.raises(CreditRefused):
        admission.check(owing, unsettled=flops(1))
    swarm.serve(server, newcomer, 50)  # served while idle: free when idle
    assert (await admission.admit(newcomer.me, idle=True)).headroom() < 0
    with pytest.raises(CreditRefused):
        await admission.admit(newcomer.me, idle=False)


async def test_standing_raises_the_allowance_and_a_farmed_balance_does_not():
    swarm = Swarm(CreditPolicy(debt_limit=flops(10)))
    server, helper, upstream, farmer, accomplice = (swarm.peer(n) for n in
                                                    ("server", "helper", "upstream", "farmer", "accomplice"))
    swarm.serve(helper, server, 500)  # the helper served the server ...
    swarm.serve(upstream, helper, 200)  # ... and upstream served the helper: its work reached the server too
    swarm.serve(farmer, accomplice, 3_600_000)  # an hour the farmer never worked, signed by its accomplice
    swarm.replicate()
    admission = Admission(server, StandingView(server, max_age=0))
    balances = await server.balances()
    assert balances[farmer.me].effective == flops(3_600_000)  # the shared fold shows the farm ...
    farmed = await admission.position(farmer.me)
    assert (farmed.standing, farmed.allowance) == (0, flops(10))  # ... the server's own view does not
    assert (await admission.position(helper.me)).allowance == flops(10) + flops(500)
    assert (await admission.position(upstream.me)).standing == flops(200)
    # the farmer consumes within a newcomer's allowance, however large its balance
    swarm.serve(server, farmer, 10)
    swarm.replicate()
    with pytest.raises(CreditRefused):
        admission.check(await admission.position(farmer.me), unsettled=flops(1))
    assert (await server.balance(farmer.me)).effective > 0
    # the helper's standing covers what it consumes (here and elsewhere: it paid upstream 200)
    swarm.serve(server, helper, 200)
    helping = await admission.position(helper.me)
    assert helping.owed == flops(400)
    admission.check(helping, unsettled=flops(110))
    with pytest.raises(CreditRefused):
        admission.check(helping, unsettled=flops(111))


async def test_grants_count_against_what_a_client_owes():
    authority = Identity(hashlib.sha256(b"authority").digest())
    swarm = Swarm(CreditPolicy(debt_limit=0, grant_authorities=frozenset([authority.public_key])))
    server, member = swarm.peer("server"), swarm.peer("member")
    funder = Ledger(authority, Store(None), pricing=PRICING, policy=swarm.policy, clock=lambda: swarm.now)
    swarm.ledgers.append(funder)
    await funder.grant(member.me, flops(50))
    swarm.serve(server, member, 40)
    swarm.replicate()
    admission = Admission(server, StandingView(server, max_age=0))
    position = await admission.position(member.me)
    assert position.owed == flops(40) - flops(50) and position.standing == 0
    admission.check(position, unsettled=flops(10))  # the grant covers 50 tokens in all
    with pytest.raises(CreditRefused):
        admission.check(position, unsettled=flops(11))


async def test_a_peer_cannot_serve_itself_into_balance_or_standing():
    swarm = Swarm()
    me, other = swarm.peer("me"), swarm.peer("other")
    with pytest.raises(InvalidReceipt):  # no receipt names one key as both client and server
        swarm.sign(me, me, 1_000_000)
    # nor does any edge from a key to itself count, should a store hold one
    graph = WorkGraph.from_transfers([(me.me, me.me, flops(10**6)), (other.me, me.me, flops(5))])
    assert graph.received == {me.me: {other.me: flops(5)}}
    assert standings(graph, other.me) == {} and standings(graph, me.me) == {other.me: flops(5)}


@pytest.mark.parametrize("sybil_clients", [1, 10, 100])
async def test_self_dealing_for_an_hour_gains_no_standing_in_any_honest_view(sybil_clients):
    swarm = Swarm()
    honest = [swarm.peer(f"honest {i}") for i in range(4)]
    attacker = swarm.peer("attacker")
    sybils = [swarm.peer(f"sybil {i}") for i in range(sybil_clients)]
    for minute in range(1, 61):  # an hour, minute by minute; earn entries every 10 minutes (as billing does)
        swarm.now += 60
        settle = minute % 10 == 0
        for sybil in sybils:
            receipt = swarm.sign(sybil, attacker, 60_000)  # "1,000 tokens/s" the attacker never computed
            back = swarm.sign(attacker, sybil, 6_000)  # and a tenth of that the other way round
            small = swarm.sign(sybil, honest[0], 10)  # real work the Sybils consume from an honest server
            if settle:
                attacker.append_sync("earn", _earn_body(receipt))
                sybil.append_sync("earn", _earn_body(back))
                honest[0].append_sync("earn", _earn_body(small))
        for i, server in enumerate(honest):  # honest peers serve each other, in a ring
            receipt = swarm.sign(honest[(i + 1) % 4], server, 600)
            if settle:
                server.append_sync("earn", _earn_body(receipt))
    swarm.replicate(honest)  # what the honest peers hold after gossip

    farm = {attacker.me} | {s.me for s in sybils}
    ring = flops(600 * 60)  # what each honest peer did for the next in an hour
    farmed = (await honest[1].balances())[attacker.me].effective  # what every peer's shared fold shows
    assert farmed == sybil_clients * (flops(3_600_000) - flops(360_000)) > 50 * ring
    for i, viewer in enumerate(honest):
        view = await StandingView(viewer, max_age=0).standings()
        assert all(view.get(key, 0) == 0 for key in farm), "self-dealing counted in an honest view"
        served_me, served_them = honest[i - 1], honest[i - 2]
        assert view[served_me.me] == ring  # direct work: full standing
        assert view[served_them.me] == ring  # relayed in full: served_me passed on all it received
        admission = Admission(viewer, StandingView(viewer, max_age=0))
        position = await admission.position(attacker.me)
        assert position.standing == 0 and position.allowance == viewer.policy.debt_limit
    print(f"\n{sybil_clients} Sybil clients, an hour: the attacker's balance is {farmed / 1e9:,.0f} GFLOP-credits "
          f"in the shared fold; its standing in every honest view: 0; honest ring work keeps {ring / 1e9:,.0f} each")
