"""A hostile peer cannot take an honest block server down (issue #13, the server's part):

- the KV cache and session slots: "open" reserves only what a session starts with and the cache grows as it computes;
  one client without credit holds at most its share (of the cache and of the sessions); sessions that never compute expire quickly;
  a client with standing (its work reached the server) displaces idle sessions of clients without;
- compute: every step (the first and the prefill too) is paid for before it runs, by a receipt
  that covers it; a client that never pays gets nothing, and one that signs without credit gets at
  most its debt allowance, per fresh identity too;
- forwarding: a push goes only to a server that announces the next blocks, never to an address a
  client names.

Each test prints what an attacker got (run with -s to see the figures)."""

import pytest
import torch
import trio

from credits import CreditPolicy, ReceiptSigner, StandingView
from p2p.identity import Identity, peer_id_from_public_key
from pipeline import protocol as proto
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.client import ClientConfig, DistributedModel
from pipeline.errors import REFUSALS, Busy, CacheFull, InsufficientCredit, PushRefused
from pipeline.loading import ModelFolder
from pipeline.protocol import pack_hidden
from pipeline.server import BlockServer, ServerConfig
from testkit.billing import give_standing, make_ledger
from testkit.swarms import FIXED_TP, swarm

PROMPT = [5, 17, 42, 8, 99, 3]
LONG = [(7 * i) % 100 for i in range(50)]
H = 64
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 blocks, 2 kv heads, head_dim 16, float32


@pytest.fixture(scope="module")
def llama(llama):
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


async def ledger_peer(s, *, client_mode, mid, cfg, policy):
    peer = await s._peer(client_mode=client_mode)
    peer.ledger = make_ledger(peer.network.identity, None, mid, cfg, policy)
    return peer


async def billed_server(s, *, mid, cfg, debt_limit, **server_cfg):
    """A server of all 4 blocks that is the swarm's grant authority (it can fund clients' balances); its
    view of standing follows every change of its ledger at once (max_age=0)."""
    peer = await s._peer(client_mode=False)
    policy = CreditPolicy(starting_grant=0, debt_limit=debt_limit,
                          grant_authorities=frozenset([peer.network.identity.public_key]))
    peer.ledger = make_ledger(peer.network.identity, None, mid, cfg, policy)
    conf = ServerConfig(throughput=FIXED_TP, announce_period=5.0, **server_cfg)
    peer.server = BlockServer(peer.network, peer.dht, s.folder, 0, 4, config=conf, model_id=mid,
                              billing=ServerBilling(peer.ledger, standing=StandingView(peer.ledger, max_age=0)))
    await peer.nursery.start(peer.server.run)
    s.servers.append(peer)
    return peer


async def billed_client(s, srv, *, mid, cfg, grant=0, served_tokens=0):
    """A client; `grant`: FLOPs the server grants it (balance); `served_tokens`: work it did for the
    server (standing in the server's view)."""
    peer = await ledger_peer(s, client_mode=True, mid=mid, cfg=cfg, policy=srv.ledger.policy)
    if grant:
        await srv.ledger.grant(peer.network.identity.public_key, grant)
    if served_tokens:
        await give_standing(peer.ledger, srv.ledger, model=mid, start=0, end=4, tokens=served_tokens)
    s.clients.append(peer)
    conf = ClientConfig(billing=ClientBilling(peer.ledger), spot_check=None, step_timeout=10.0)
    model = await DistributedModel.from_pretrained(s.folder, peer.network, peer.dht, model_id=mid, config=conf)
    return peer, model


async def raw_stream(peer, server_peer, protocol=proto.INFERENCE):
    net = peer.network
    net.add_address(server_peer.network.peer_id, server_peer.network.listen_addrs()[0])
    return await net.open_stream(server_peer.network.peer_id, protocol)


async def ask(stream, msg) -> dict:
    await stream.send(msg)
    with trio.fail_after(5):
        return await stream.receive()


def open_msg(mid, a=0, b=4, max_length=8):
    return {"t": "open", "model": mid, "start": a, "end": b, "max_length": max_length, "dtype": "float32"}


def held_by(server, peer) -> int:
    return sum(x.nbytes for x in server.sessions.values() if x.peer_id == peer.network.peer_id)


async def test_cache_hog_holds_a_share_briefly_and_is_displaced(llama):
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 4)
    budget = 64 * KV_BYTES_PER_TOKEN  # the tiny model's whole context
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            # the strangers' pool may take the whole budget here: this test is about one key's share and
            # displacement (the pool: tests/test_kv_strangers.py)
            srv = await billed_server(s, mid=mid, cfg=cfg, debt_limit=10**12, cache_budget_bytes=budget,
                                      strangers_cache_share=1.0, initial_cache_tokens=4, displace_idle_after=3.0,
                                      first_step_timeout=8.0, session_timeout=60.0)
            server = srv.server
            mallory, sybil = [await ledger_peer(s, client_mode=True, mid=mid, cfg=cfg, policy=srv.ledger.policy)
                              for _ in range(2)]
            # a session longer than a credit-less client's share (half the budget: 32 tokens) is refused
            st = await raw_stream(mallory, srv)
            too_long = await ask(st, open_msg(mid, max_length=40))
            assert too_long["kind"] == "CacheFull" and too_long["limit"] == 32
            assert REFUSALS[too_long["kind"]] is CacheFull
            # a credit-less open books its whole max_length (4 tokens would be reserved with standing) ...
            assert (await ask(st, open_msg(mid, max_length=16)))["t"] == "opened"
            assert held_by(server, mallory) == 16 * KV_BYTES_PER_TOKEN
            # ... and 4 more sessions of 4 tokens fill mallory's share, no more
            streams, opened = [st], 1
            while True:
                streams.append(await raw_stream(mallory, srv))
                reply = await ask(streams[-1], open_msg(mid, max_length=4))
                if reply["t"] != "opened":
                    break
                opened += 1
            assert opened == 5 and reply["kind"] == "CacheFull" and reply["limit"] == 0
            hog = held_by(server, mallory)
            print(f"\ncache one credit-less key holds: {hog} of {budget} bytes ({hog / budget:.0%}); "
                  f"each idle open books its max_length")
            assert hog == budget // 2
            # a second credit-less key takes the other half: the budget is full
            for _ in range(8):
                assert (await ask(await raw_stream(sybil, srv), open_msg(mid, max_length=4)))["t"] == "opened"
            assert server.cache_used == budget
            # while those sessions are fresh, an honest client without credit is refused, typed (it can route
            # elsewhere) ...
            _, poor = await billed_client(s, srv, mid=mid, cfg=cfg)
            with pytest.raises(CacheFull):
                await poor.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert not poor.sequence.banned() and server.stats["displaced"] == 0
            # ... once they are idle, a newcomer without standing (a balance, a grant, is no standing here)
            # displaces the idle sessions it needs ...
            await trio.sleep(server.config.displace_idle_after)
            _, funded = await billed_client(s, srv, mid=mid, cfg=cfg, grant=10**12)
            g = await funded.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert g.token_ids == want
            displaced = server.stats["displaced"]
            assert displaced >= 1
            # ... and so does one with standing (its work reached this server), as its cache grows past what is free
            _, rich = await billed_client(s, srv, mid=mid, cfg=cfg, served_tokens=10)
            g = await rich.generate(LONG, max_new_tokens=4, stop_token_ids=[])
            assert g.token_ids == local.generate_greedy(LONG, 4)
            assert server.stats["displaced"] > displaced
            # sessions that never compute are dropped after first_step_timeout (not session_timeout)
            t0 = trio.current_time()
            with trio.fail_after(server.config.first_step_timeout + 2):
                while server.sessions:
                    await trio.sleep(0.05)
            assert trio.current_time() - t0 <= server.config.first_step_timeout + 1
            assert server.cache_used == 0 and server.stats["expired"] >= 1


async def test_cache_grows_with_the_tokens_computed(llama):
    path, mid, local, cfg = llama
    want = local.generate_greedy(LONG, 6)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4)], model_id=mid, stranger_open_cache_tokens=8) as s:
            server = s.servers[0].server
            model = await s.client(spot_check=None)
            async with model.inference_session(64) as session:
                # no billing, so no standing: the session's max_length is booked at open, the cache allocated as it grows
                (served,) = server.sessions.values()
                assert server.cache_used == 64 * KV_BYTES_PER_TOKEN and served.cache.capacity == 8
                await session.step(await model.embed(PROMPT))
                assert served.cache.capacity == 8
                await session.step(await model.embed(LONG))  # 56 tokens: grows to fit
                assert served.cache.capacity == 56
                await session.step(await model.embed([1]))  # doubles, up to the session's max_length
                assert served.cache.capacity == 64 and server.cache_used == 64 * KV_BYTES_PER_TOKEN
            g = await model.generate(LONG, max_new_tokens=6, stop_token_ids=[])  # grows mid-generation
            assert g.token_ids == want  # what the cache held was copied bit for bit


def sign_for(peer, server_peer, *, mid, session_id, tokens, signer=None):
    signer = signer or ReceiptSigner(peer.network.identity, server=server_peer.ledger.me, model=mid, start=0, end=4,
                                     pricing=peer.ledger.pricing, session=session_id)
    return signer, signer.sign(tokens).to_list()


async def test_no_compute_before_payment_and_debt_allowance_per_identity(llama):
    path, mid, local, cfg = llama
    with trio.fail_after(120):
        async with swarm("sim", path, [], model_id=mid) as s:
            pricing = make_ledger(Identity.generate(), None, mid, cfg).pricing
            allowance = pricing(mid, 0, 4, 40)  # the debt limit: 40 tokens through the 4 blocks
            srv = await billed_server(s, mid=mid, cfg=cfg, debt_limit=allowance)
            server = srv.server
            _, rich = await billed_client(s, srv, mid=mid, cfg=cfg, grant=100 * allowance)
            async with rich.inference_session(64) as busy:  # the server is busy: debtors are not free
                await busy.step(await rich.embed(PROMPT))
                base = server.stats["tokens"]

                # 1. never pays: not even the first step (the prefill) is computed
                mallory = await ledger_peer(s, client_mode=True, mid=mid, cfg=cfg, policy=srv.ledger.policy)
                st = await raw_stream(mallory, srv)
                opened = await ask(st, open_msg(mid, max_length=64))
                prefill = {"t": "step", "id": 1, "pos": 0, "h": pack_hidden(torch.randn(1, 32, H))}
                reply = await ask(st, prefill)
                assert reply["kind"] == "ReceiptRequired", reply
                # a receipt for less than the step (here: for 1 of its 32 tokens) is not enough either
                signer, short = sign_for(mallory, srv, mid=mid, session_id=opened["session"], tokens=1)
                assert (await ask(st, {**prefill, "receipt": short}))["kind"] == "ReceiptRequired"
                assert server.stats["tokens"] == base
                # ... while a receipt that covers it gets it computed
                _, full = sign_for(mallory, srv, mid=mid, session_id=opened["session"], tokens=32, signer=signer)
                assert (await ask(st, {**prefill, "receipt": full}))["t"] == "out"
                assert server.stats["tokens"] == base + 32
                await st.aclose()

                # 2. fresh identities that sign but never hold credit: each gets at most the allowance
                got = []
                for _ in range(3):
                    peer, sybil = await billed_client(s, srv, mid=mid, cfg=cfg)
                    before = server.stats["tokens"]
                    t0 = trio.current_time()
                    with pytest.raises(InsufficientCredit):
                        await sybil.generate(LONG[:30], max_new_tokens=30, stop_token_ids=[])  # 60 > 40 tokens
                    with pytest.raises(InsufficientCredit):  # the same key again: nothing more
                        await sybil.generate(PROMPT, max_new_tokens=30, stop_token_ids=[])
                    with trio.fail_after(5):
                        while any(x.peer_id == peer.network.peer_id for x in server.sessions.values()):
                            await trio.sleep(0.02)
                    spent = (await srv.ledger.balance(peer.network.identity.public_key)).spent
                    got.append((server.stats["tokens"] - before, spent, trio.current_time() - t0))
                    assert 0 < spent <= allowance
                    assert not sybil.sequence.banned()  # a refusal, not a fault
            print(f"\nunpaid compute: a never-paying client got 0 tokens; each fresh key got {got} "
                  f"(tokens, FLOPs it owes, s) of an allowance of {allowance} FLOPs")
            assert server.billing.stats["over_allowance"] >= 3 and server.billing.stats["unpaid_refusals"] >= 2


@pytest.mark.parametrize("backend", ["sim", "libp2p"])
async def test_push_goes_only_to_announced_servers(llama, backend):
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm(backend, path, [(0, 2), (2, 4), (0, 2)], model_id=mid) as s:
            first, second, other = s.servers
            await s.client()
            client = s.clients[-1]
            # a peer that serves nothing, listening for pushes (it must never hear from the server)
            victim = await s._peer(client_mode=True)
            dialled = []

            async def record(stream):
                dialled.append(stream.peer_id)
                await stream.aclose()

            victim.network.set_stream_handler(proto.PUSH, record)
            connections = []
            if backend == "libp2p":  # and a plain TCP port a client might name as the address
                listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
                port = listeners[0].socket.getsockname()[1]

                async def accept(task_status=trio.TASK_STATUS_IGNORED):
                    async with listeners[0]:
                        task_status.started()
                        while True:
                            conn = await listeners[0].accept()
                            connections.append(conn)

                await s.nursery.start(accept)
            st = await raw_stream(client, first)
            assert (await ask(st, open_msg(mid, 0, 2)))["t"] == "opened"
            st2 = await raw_stream(client, second)
            opened2 = await ask(st2, open_msg(mid, 2, 4))
            x = pack_hidden(torch.randn(1, 3, H))
            stranger = peer_id_from_public_key(Identity.generate().public_key)
            named = {victim.network.peer_id: victim.network.listen_addrs()[0]}
            if backend == "libp2p":
                named[stranger] = f"/ip4/127.0.0.1/tcp/{port}/p2p/{stranger}"
            # not a server; a server of the same blocks (not the next ones); the server itself
            targets = [victim.network.peer_id, other.network.peer_id, first.network.peer_id]
            if backend == "libp2p":
                targets.append(stranger)
            for i, target in enumerate(targets, start=1):
                reply = await ask(st, {"t": "step", "id": i, "pos": 0, "h": x, "addrs": named,
                                       "push": [{"peer": target, "session": opened2["session"]}]})
                assert reply["t"] == "error" and reply["kind"] == "PushRefused", reply
                assert REFUSALS[reply["kind"]] is PushRefused
            assert first.server.stats["steps"] == 0 and first.server.stats["pushes_refused"] == len(targets)
            # the announced server of the next blocks is pushed to
            out = await ask(st, {"t": "step", "id": 10, "pos": 0, "h": x, "addrs": named,
                                 "push": [{"peer": second.network.peer_id, "session": opened2["session"]}]})
            assert out["t"] == "out" and out["pushed"]
            with trio.fail_after(5):
                pushed = await st2.receive()
            assert pushed["t"] == "out" and pushed["id"] == 10
            await trio.sleep(0.2)
            assert dialled == [] and connections == []
            assert first.network.address_of(stranger) is None


async def test_one_client_cannot_take_every_session(llama):
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4)], model_id=mid, max_sessions=4) as s:
            srv = s.servers[0]
            await s.client()
            await s.client()
            mallory, honest = s.clients
            streams = [await raw_stream(mallory, srv) for _ in range(3)]
            assert [(await ask(st, open_msg(mid)))["t"] for st in streams[:2]] == ["opened", "opened"]
            refused = await ask(streams[2], open_msg(mid))
            assert refused["kind"] == "TooManySessions" and REFUSALS[refused["kind"]] is Busy
            assert (await ask(await raw_stream(honest, srv), open_msg(mid)))["t"] == "opened"
