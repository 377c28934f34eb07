"""Credits inside inference sessions: receipts per step, earn/spend entries that match and replicate,
admission by what a client owes against its allowance (debt limit + standing in the server's view,
free when idle), compute ordered by standing, unpaid clients cut off."""

import pytest
import torch
import trio

from credits import CreditPolicy, StandingView
from credits.ledger import GFLOP
from pipeline.batching import BatchStep
from pipeline.billing import ClientBilling
from pipeline.client import GenerationFailed
from pipeline.errors import InsufficientCredit, ReceiptRequired, Refused
from pipeline.limiter import PriorityLimiter
from pipeline.loading import ModelFolder
from pipeline.server import BlockServer
from testkit.billing import POLICY, add_client, add_server, give_standing, latest_receipts, make_ledger
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]


@pytest.fixture(scope="module")
def llama(llama):
    """The shared tiny Llama (tests/conftest.py) and its config, which the ledgers price receipts by."""
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


async def test_generation_earn_spend_match_and_balances_replicate(llama, tmp_path):
    """3 servers + a client on in-process libp2p, each with its own on-disk ledger and replicator."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 8)
    from pipeline.spotcheck import SpotCheckConfig

    with trio.fail_after(90):
        async with swarm("libp2p", path, [], model_id=mid) as s:
            servers = [await add_server(s, a, b, mid=mid, cfg=cfg, data_dir=tmp_path / f"s{i}", replicate=True)
                       for i, (a, b) in enumerate([(0, 2), (2, 4), (0, 2)])]
            # every step is spot-checked, so the third server earns as a checker
            client, model = await add_client(s, mid=mid, cfg=cfg, data_dir=tmp_path / "c", replicate=True,
                                             spot_check=SpotCheckConfig(fraction=1.0, seed=1))
            g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == want
            peers = servers + [client]
            # the servers append their earn entries when the sessions end
            with trio.fail_after(10):
                while sum(p.server.billing.stats["earn_entries"] for p in servers) < 3:
                    await trio.sleep(0.05)
            # replication settles: every ledger holds every chain at the same head
            with trio.fail_after(30):
                while True:
                    heads = [p.ledger.heads for p in peers]
                    if all(len(h) == 4 for h in heads) and all(h == heads[0] for h in heads):
                        break
                    await trio.sleep(0.1)
            views = [{k: b.raw for k, b in (await p.ledger.balances()).items()} for p in peers]
            assert all(v == views[0] for v in views)
            assert sum(views[0].values()) == 4 * POLICY.starting_grant  # conserved
            ck = client.ledger.me
            spends = latest_receipts(client.ledger, ck, "spend")
            total = 0
            for p in servers:
                earns = latest_receipts(p.ledger, p.ledger.me, "earn")
                mine = {k: r for k, r in spends.items() if r.server == p.ledger.me}
                assert earns.keys() == mine.keys() and earns  # every server served (one as the checker)
                for k, r in earns.items():
                    assert r.flops == mine[k].flops and r.counter == mine[k].counter
                    # tokens: the whole session (prompt + generated inputs, plus the checker's replays)
                    assert r.tokens >= len(PROMPT) + 7
                earned = sum(r.flops for r in earns.values())
                assert views[0][p.ledger.me] == POLICY.starting_grant + earned
                total += earned
            assert views[0][ck] == POLICY.starting_grant - total
            # every peer verified the same receipts: nothing refused anywhere
            assert all(p.replicator.stats["rejected"] == 0 for p in peers)
            assert model.client_config.billing.stats["spend_entries"] == len(spends)
    for p in peers:
        p.ledger.store.close()


async def test_long_sessions_earn_periodically_and_count_once(llama):
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            srv = await add_server(s, 0, 4, mid=mid, cfg=cfg, billing_kw={"earn_every": 3})
            client, model = await add_client(s, mid=mid, cfg=cfg)
            await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            with trio.fail_after(5):
                while srv.server.sessions:
                    await trio.sleep(0.02)
            earns = [e for e in srv.ledger.store.entries(srv.ledger.me) if e.kind == "earn"]
            assert len(earns) >= 3  # periodic entries, then the final one
            (final,) = latest_receipts(srv.ledger, srv.ledger.me, "earn").values()
            (spent,) = latest_receipts(client.ledger, client.ledger.me, "spend").values()
            assert final == spent and final.tokens == len(PROMPT) + 9
            bal = await srv.ledger.balance(srv.ledger.me)
            assert bal.earned == final.flops  # cumulative receipts: only the latest counts
            assert srv.server.status()["billing"]["earn_entries"] == len(earns)


class StopsSigning(ClientBilling):
    """A client that stops signing receipts after `after` of them."""

    after = 3

    def receipt(self, peer_id, session_id, info):
        if self.stats["receipts"] >= self.after:
            return None
        return super().receipt(peer_id, session_id, info)


async def test_client_that_stops_signing_is_cut_off(llama):
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            servers = [await add_server(s, a, b, mid=mid, cfg=cfg) for a, b in [(0, 2), (2, 4)]]
            _, model = await add_client(s, mid=mid, cfg=cfg, billing_cls=StopsSigning)
            with pytest.raises(GenerationFailed, match="the client stopped signing receipts") as cut:
                await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert isinstance(cut.value, ReceiptRequired) and not model.sequence.banned()
            refused = sum(p.server.billing.stats["unpaid_refusals"] for p in servers)
            assert refused >= 1
            for p in servers:
                # what each server served beyond what it holds receipts for is at most one step
                await trio.sleep(0.1)
                earns = latest_receipts(p.ledger, p.ledger.me, "earn")
                assert all(r.tokens >= 1 for r in earns.values())
                assert p.server.stats["tokens"] - sum(r.tokens for r in earns.values()) <= len(PROMPT)
            # a forged receipt (signed by someone else) is refused before any compute
            from credits import ReceiptSigner
            from p2p.identity import Identity

            mallory = Identity.generate()

            class Forger(ClientBilling):
                """Sends receipts signed by mallory that claim to be the client's."""

                def receipt(self, peer_id, session_id, info):
                    owed = info.get("served", 0) + info.get("tokens", 0)  # served so far and this step
                    if not owed:
                        return None
                    from p2p.identity import public_key_from_peer_id

                    rs = ReceiptSigner(mallory, server=public_key_from_peer_id(peer_id), model=mid, start=info["start"],
                                       end=info["end"], pricing=s.servers[0].ledger.pricing, session=session_id)
                    r = rs.sign(owed)
                    lst = r.to_list()
                    lst[1] = model.network.identity.public_key  # claim it is the client's
                    return lst

            model.client_config.billing = Forger(model.client_config.billing.ledger)
            with pytest.raises(GenerationFailed, match="BadReceipt"):
                await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])


class OverstatesServed(BlockServer):
    """Claims a thousand tokens more served than it computed in every "out"."""

    async def _step(self, session, m, *, pushed):
        reply = await super()._step(session, m, pushed=pushed)
        if reply is not None:
            reply["served"] += 1000
        return reply


@pytest.mark.parametrize("push,liar_first", [(False, True), (True, True), (True, False)],
                         ids=["direct", "push-first-hop", "push-pushed-hop"])
async def test_client_never_signs_for_more_than_it_sent(llama, push, liar_first):
    """A server overstating "served" is a fault (banned, not a refusal), and the client's receipts for it
    cover only the tokens it sent — with server-to-server push too, whether the liar is the hop the
    client sends to or one the step is pushed to (not a push fallback that re-sends the step and then
    meets the liar's refusal of the short receipt)."""
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            first = await add_server(s, 0, 2, mid=mid, cfg=cfg, server_cls=OverstatesServed if liar_first else BlockServer)
            second = await add_server(s, 2, 4, mid=mid, cfg=cfg, server_cls=BlockServer if liar_first else OverstatesServed)
            liar = first if liar_first else second
            client, model = await add_client(s, mid=mid, cfg=cfg)
            model.client_config.push = push
            with pytest.raises(GenerationFailed) as failed:
                await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert not isinstance(failed.value, Refused) and "OverstatedServed" in str(failed.value)
            assert liar.network.peer_id in model.sequence.banned()
            spends = latest_receipts(client.ledger, client.ledger.me, "spend")
            signed = [r.tokens for r in spends.values() if r.server == liar.ledger.me]
            assert signed and max(signed) <= len(PROMPT)  # the prefill it was sent, not a token more


def test_a_receipt_refusal_moves_the_count_only_to_steps_that_were_sent():
    """`RemoteHop.reconcile`: a ReceiptRequired naming the count the server would have after computing
    pushes we stopped waiting for (step 2, then 3) moves the hop's count there, in order; a count beyond
    every step sent is not believed (the refusal stands, we sign for nothing more)."""
    from p2p.identity import Identity
    from pipeline.hop import RemoteHop

    def hop() -> RemoteHop:
        h = RemoteHop(Identity.generate().peer_id, 0, 2, None, b"s" * 16, model_id="m", dtype="float32", seed=b"x")
        h.counted = h.served = 7
        h.last_pos, h.last_tokens = 6, 1
        h.note_sent(2, 7, 1)  # pushed, never answered
        h.note_sent(3, 8, 1)  # pushed, never answered
        h.note_sent(4, 7, 1)  # the redo of step 2, refused
        return h

    nobody = hop()
    assert nobody.reconcile(8, 4, 7, 1) and nobody.served == 7 and nobody.sent == {2: (7, 1), 3: (8, 1)}
    first = hop()  # step 2 computed: 8 served before a redo at 7 (a whole step redone is paid again)
    assert first.reconcile(9, 4, 7, 1) and (first.served, first.counted) == (8, 8) and first.sent == {3: (8, 1)}
    both = hop()  # steps 2 and 3 computed: 9 served before a redo of step 3 at 8
    assert both.reconcile(10, 4, 8, 1) and (both.served, both.counted) == (9, 9) and both.sent == {}
    liar = hop()
    assert not liar.reconcile(11, 4, 7, 1) and (liar.served, liar.counted) == (7, 7)


async def test_debtor_refused_when_busy_served_when_idle(llama):
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 4)
    poor = CreditPolicy(starting_grant=0, debt_limit=0)
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            srv = await add_server(s, 0, 4, mid=mid, cfg=cfg, policy=poor)
            _, debtor = await add_client(s, mid=mid, cfg=cfg, policy=poor)
            _, other = await add_client(s, mid=mid, cfg=cfg, policy=poor)
            g = await debtor.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])  # balance 0: served
            assert g.token_ids == want
            with trio.fail_after(5):
                while srv.server.billing.stats["earn_entries"] < 1:
                    await trio.sleep(0.02)
            bal = await srv.ledger.balance(debtor.network.identity.public_key)
            assert bal.effective < 0  # now in debt, as the server sees it
            async with other.inference_session(16) as busy:  # the server is busy with another client
                await busy.step(await other.embed(PROMPT))
                with pytest.raises(GenerationFailed, match="CreditRefused.*potluck serve --model .* --blocks auto") as no:
                    await debtor.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
                assert isinstance(no.value, InsufficientCredit) and no.value.kind == "CreditRefused"
                assert not debtor.sequence.banned()  # a refusal is not a fault
            with trio.fail_after(5):
                while srv.server.sessions:
                    await trio.sleep(0.02)
            g = await debtor.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])  # idle: free
            assert g.token_ids == want
            assert srv.server.billing.stats["refused"] == 1 and srv.server.billing.stats["admitted_idle"] >= 2


async def test_priority_limiter_orders_by_balance_fifo_within():
    lim = PriorityLimiter(1)
    order = []
    await lim.acquire_on_behalf_of("holder")

    async def waiter(name, prio):
        await lim.acquire_on_behalf_of(name, prio)
        order.append(name)
        await trio.sleep(0.01)
        lim.release_on_behalf_of(name)

    async with trio.open_nursery() as nursery:
        for name, prio in [("a5", 5), ("b1", 1), ("c9", 9), ("d5", 5), ("e3", 3), ("f-2", -2)]:
            nursery.start_soon(waiter, name, prio)
            await trio.sleep(0.001)
        # a cancelled waiter leaves the queue
        with trio.move_on_after(0.01):
            await lim.acquire_on_behalf_of("gone", 100)
        assert lim.waiting == 6
        lim.release_on_behalf_of("holder")
    assert order == ["c9", "a5", "d5", "e3", "b1", "f-2"]
    assert lim.borrowed_tokens == 0
    # as a trio thread limiter
    assert await trio.to_thread.run_sync(lambda: 7, limiter=lim.at(3)) == 7


async def test_server_queues_steps_by_client_standing_not_balance(llama):
    """Waiting steps go highest standing (in the server's own view) first — batches are filled in that
    order (pipeline/batching.py); a client the server funded with a large grant, but whose work never
    reached it, waits behind every client with standing."""
    path, mid, local, cfg = llama
    holder = {}

    def policy_fn(ident):  # the server is a grant authority, so it can fund one client richly
        holder.setdefault("key", ident.public_key)
        return CreditPolicy(starting_grant=0, grant_authorities=frozenset([holder["key"]]))

    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            srv = await add_server(s, 0, 4, mid=mid, cfg=cfg, policy_fn=policy_fn)
            policy = srv.ledger.policy
            clients = [await add_client(s, mid=mid, cfg=cfg, policy=policy) for _ in range(4)]
            standing = [await give_standing(peer.ledger, srv.ledger, model=mid, start=0, end=4, tokens=tokens)
                        for (peer, _), tokens in zip(clients[:3], (5, 50, 20))]
            await srv.ledger.grant(clients[3][0].network.identity.public_key, 10**6 * GFLOP)  # balance, no standing
            assert (await srv.ledger.balance(clients[3][0].network.identity.public_key)).effective > max(standing)
            ready, go = [trio.Event() for _ in clients], trio.Event()
            lim, batcher = srv.server.limiter, srv.server.batcher

            async def run(i, model):
                async with model.inference_session(16) as sess:
                    ready[i].set()
                    await go.wait()
                    await sess.step(await model.embed(PROMPT))

            async with trio.open_nursery() as nursery:
                for i, (_, model) in enumerate(clients):
                    nursery.start_soon(run, i, model)
                for e in ready:
                    await e.wait()
                await lim.acquire_on_behalf_of("test")  # the compute thread is busy with a batch in flight
                span = srv.server.span
                busy = BatchStep(span, span.new_cache(4), torch.zeros(1, 1, cfg.hidden_size), 0, [1], 4)
                nursery.start_soon(batcher.submit, busy)
                with trio.fail_after(10):
                    while not busy.taken:
                        await trio.sleep(0.01)
                go.set()
                with trio.fail_after(10):
                    while batcher.waiting < 4:
                        await trio.sleep(0.01)
                lim.release_on_behalf_of("test")
            assert batcher.served[-4:] == sorted(standing, reverse=True) + [0]


async def test_disputes_count_only_as_the_viewers_own_verdicts_and_never_move_balances(llama, tmp_path):
    """Disputes used to cut what the accused earned in every peer's fold, on the accuser's word alone.
    Now the fold ignores them; a verdict this peer reached itself zeroes the liar's reliability (routing,
    standing) and a false accusation the accuser's, in this peer's view only."""
    from credits import ReceiptSigner
    from p2p.identity import Identity

    path, mid, local, cfg = llama
    ids = [Identity.generate() for _ in range(4)]  # 0: accused server, 1: serving accuser, 2: Sybil, 3: client
    leds = [make_ledger(i, None, mid, cfg) for i in ids]
    for led in leds:
        await led.claim_starting_grant()
    for server in (0, 1):
        rs = ReceiptSigner(ids[3], server=ids[server].public_key, model=mid, start=0, end=2, pricing=leds[server].pricing)
        await leds[server].record_earn(rs.sign(5))
    face = leds[1].pricing(mid, 0, 2, 5)
    await leds[1].record_dispute(ids[0].public_key, "spot check failed", b"")
    await leds[2].record_dispute(ids[0].public_key, "spot check failed", b"")
    viewer = leds[3]
    for led in leds[:3]:
        wires = led.store.range_wire(led.me, 1, 100)
        assert (await viewer.ingest(wires)).stored == len(wires)
    assert await viewer.reliability() == {}  # claims without a verdict count nothing
    balances = await viewer.balances()
    assert balances[ids[0].public_key].earned == face and balances[ids[3].public_key].spent == 2 * face
    assert sum(b.raw for b in balances.values()) == sum(b.granted for b in balances.values())  # conserved
    # the viewer judged one dispute a proven lie, the other a false accusation
    disputes = {e.author: e for e, _, _ in await viewer.unjudged_disputes()}
    await viewer.record_verdict(ids[1].public_key, disputes[ids[1].public_key].seq, ids[0].public_key, True)
    await viewer.record_verdict(ids[2].public_key, disputes[ids[2].public_key].seq, ids[0].public_key, False)
    assert await viewer.reliability() == {ids[0].public_key: 0.0, ids[2].public_key: 0.0}
    assert {k: b.raw for k, b in (await viewer.balances()).items()} == {k: b.raw for k, b in balances.items()}
    assert await viewer.unjudged_disputes() == []
    # the liar's work is worth nothing in the viewer's standing; the honest server's stays
    table = StandingView(viewer).standings_sync()
    assert table == {ids[1].public_key: face}


def test_route_penalises_unreliable_servers():
    from pipeline.announce import ServerInfo
    from pipeline.routing import find_route

    a = ServerInfo("A", 0, 4, decode_tps=1000.0, prefill_tps=1e4, cache_tokens=100, reliability=0.2)
    b = ServerInfo("B", 0, 4, decode_tps=500.0, prefill_tps=1e4, cache_tokens=100)
    assert [h.peer_id for h in find_route([a, b], 0, 4)] == ["B"]
    assert [h.peer_id for h in find_route([a, b], 0, 4, reliability=lambda s: 1.0)] == ["A"]
    # the announcement carries it, checked
    v = a.to_value()
    assert ServerInfo.from_value("A", v).reliability == 0.2
    v.pop("reliability")
    assert ServerInfo.from_value("A", v).reliability == 1.0
