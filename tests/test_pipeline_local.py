"""A peer that serves blocks uses them itself, in process: alone it generates what the local model
does; its own blocks mix with remote spans in one route (direct and pushed); it never opens a stream
to itself; routes prefer its blocks where they are at least as fast; a refusal of its own server
(cache full) sends the session to a remote one; a failed remote hop is replayed next to it, and its
own session ending is recovered on a remote server; it is never spot-checked, but checks remote
hops; with credits it pays only the remote hops."""

import pytest
import torch
import trio

from pipeline.announce import ServerInfo
from pipeline.billing import ClientBilling
from pipeline.client import ClientConfig, DistributedModel, Finished, SessionStats
from pipeline.hop import LocalHop
from pipeline.routing import find_route
from pipeline.spotcheck import SpotCheckConfig
from testkit.billing import add_server, latest_receipts
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3, 61, 7]
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 blocks, 2 kv heads, head_dim 16, float32


def streams_to_self(network) -> list[str]:
    """The protocols of every stream `network` opens to its own peer id from now on."""
    opened: list[str] = []
    open_stream = network.open_stream

    async def recording(peer_id: str, protocol: str):
        if peer_id == network.peer_id:
            opened.append(protocol)
        return await open_stream(peer_id, protocol)

    network.open_stream = recording
    return opened


async def own_client(s, peer, **cfg) -> DistributedModel:
    """A client on `peer`, running its server's blocks in process."""
    return await DistributedModel.from_pretrained(s.folder, peer.network, peer.dht, model_id=s.model_id,
                                                  config=ClientConfig(**cfg), local_server=peer.server)


async def sees(model, n: int) -> None:
    with trio.fail_after(20):
        while len(await model.sequence.refresh(force=True)) < n:
            await trio.sleep(0.05)


async def greedy(model, prompt: list[int], n: int) -> tuple[list[int], list, SessionStats]:
    """`n` greedy tokens through one session: (tokens, its route, its stats once closed)."""
    tokens: list[int] = []
    async with model.inference_session(len(prompt) + n) as session:
        h = await session.step(await model.embed(prompt))
        while len(tokens) < n:
            tokens.append(int((await model.logits(h[:, -1:]))[0, -1].argmax()))
            h = await session.step(await model.embed(tokens[-1:]))
        route = session.route
    return tokens, route, session.stats


def srv(peer, a, b, tps=1000.0, cache=10_000) -> ServerInfo:
    return ServerInfo(peer_id=peer, start=a, end=b, decode_tps=tps, prefill_tps=tps * 10, cache_tokens=cache)


def test_routes_prefer_our_own_blocks_where_at_least_as_fast():
    spans = lambda route: [(h.peer_id, h.start, h.end) for h in route]  # noqa: E731
    even = [srv("remote", 0, 4), srv("me", 0, 2), srv("other", 2, 4)]
    assert spans(find_route(even, 0, 4)) == [("remote", 0, 4)]  # one hop instead of two
    route = spans(find_route(even, 0, 4, local="me"))
    assert route[0] == ("me", 0, 2) and [(a, b) for _, a, b in route] == [(0, 2), (2, 4)]
    assert spans(find_route([srv("remote", 0, 4), srv("me", 0, 4)], 0, 4, local="me")) == [("me", 0, 4)]
    slow = [srv("remote", 0, 4, tps=1000.0), srv("me", 0, 4, tps=10.0)]  # 0.4 s here vs 0.056 s there
    assert spans(find_route(slow, 0, 4, local="me")) == [("remote", 0, 4)]
    full = [srv("remote", 0, 4), srv("me", 0, 4, cache=5)]
    assert spans(find_route(full, 0, 4, need_cache_tokens=100, local="me")) == [("remote", 0, 4)]


async def test_a_client_without_its_peers_server_routes_around_it(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 6)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4), (0, 4)], model_id=mid) as s:
            me, remote = s.servers
            to_self = streams_to_self(me.network)
            model = await DistributedModel.from_pretrained(path, me.network, me.dht, model_id=mid)
            await sees(model, 2)
            for _ in range(3):  # whichever way ties fall, never through ourselves
                g = await model.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
                assert g.token_ids == want and g.route == [(remote.network.peer_id, 0, 4)]
            assert to_self == [] and not model.sequence.banned()


@pytest.mark.parametrize("backend", ["sim", "libp2p"])
async def test_peer_serving_every_block_generates_alone(llama, backend):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 10)
    with trio.fail_after(60):
        async with swarm(backend, path, [(0, 4)], model_id=mid) as s:
            peer = s.servers[0]
            to_self = streams_to_self(peer.network)
            model = await own_client(s, peer)
            await sees(model, 1)
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want
            assert g.route == [(peer.network.peer_id, 0, 4)]
            async with model.inference_session(len(PROMPT)) as session:  # logits too, in chunks
                assert all(isinstance(h, LocalHop) for h in session.hops)
                got = torch.cat([await model.logits(await session.step(await model.embed(PROMPT[a:a + 3])))
                                 for a in range(0, len(PROMPT), 3)], dim=1)
            torch.testing.assert_close(got, local.step(torch.tensor([PROMPT]), local.new_session(len(PROMPT))),
                                       rtol=1e-5, atol=1e-5)
            assert to_self == []
            assert peer.server.stats["sessions_opened"] == 2
            with trio.fail_after(5):  # closed sessions free their cache
                while peer.server.sessions or peer.server.cache_used:
                    await trio.sleep(0.01)


@pytest.mark.parametrize("push", [False, True], ids=["direct", "push"])
@pytest.mark.parametrize("backend", ["sim", "libp2p"])
async def test_own_blocks_and_remote_spans_in_one_route(llama, backend, push):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 10)
    with trio.fail_after(60):
        async with swarm(backend, path, [(0, 2), (2, 3), (3, 4)], model_id=mid) as s:
            me, second, third = s.servers
            to_self = streams_to_self(me.network)
            model = await own_client(s, me, push=push)
            await sees(model, 3)
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want
            assert g.route == [(p.network.peer_id, a, b) for p, (a, b) in
                                        [(me, (0, 2)), (second, (2, 3)), (third, (3, 4))]]
            assert g.push_fallbacks == 0
            if push:  # the remote run 2:3 → 3:4 was pushed: the client never sent the last hop a step
                assert second.server.stats["pushes_sent"] == third.server.stats["pushes_received"] > 0
            assert to_self == []


async def test_own_server_refusing_sends_the_session_elsewhere(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 6)
    with trio.fail_after(60):
        # our server's cache holds one session of 32 tokens; the remote replica has room for more
        async with swarm("sim", path, [(0, 4)], model_id=mid, cache_budget_bytes=32 * KV_BYTES_PER_TOKEN) as s:
            me = s.servers[0]
            remote = await s.add_server(0, 4)
            # no spot checks: the default policy checks every step of a new server, and would ask our own
            # (full) server to be the checker, a second refusal this test is not about
            model = await own_client(s, me, spot_check=None)
            await sees(model, 2)
            model.sequence.refresh_interval = 60.0  # keep the view that says our cache has room
            async with model.inference_session(32) as first:
                assert first.route == [(me.network.peer_id, 0, 4)]
                g = await model.generate(PROMPT, max_new_tokens=6, stop_token_ids=[])
            assert g.token_ids == want
            assert g.route == [(remote.network.peer_id, 0, 4)]
            assert me.server.stats["sessions_refused"] == 1
            assert not model.sequence.banned()  # a refusal is not a fault


async def test_remote_hop_fails_and_is_replayed_next_to_our_blocks(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 12)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 2), (2, 4), (2, 4)], model_id=mid) as s:
            me = s.servers[0]
            model = await own_client(s, me, step_timeout=5.0)
            await sees(model, 3)
            tokens, killed, g = [], None, None
            async for ev in model.stream(PROMPT, max_new_tokens=12, stop_token_ids=[]):
                if isinstance(ev, Finished):
                    g = ev.generation
                    continue
                tokens.append(ev.token_id)
                if ev.index == 4:
                    killed = ev.route[1][0]
                    await s.kill(s.server_of(killed))
            assert tokens == want and g is not None
            assert g.recoveries >= 1
            assert g.route[0] == (me.network.peer_id, 0, 2) and killed not in [p for p, _, _ in g.route]
            assert me.server.stats["sessions_opened"] == 1  # our hop went on: nothing to replay there


async def test_own_blocks_are_never_spot_checked_but_check_remote_hops(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 8)
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            # slow blocks of ours: the route takes the fast remote server; ours check it
            me = await s.add_server(0, 4, throughput={"decode_tps": 10.0, "prefill_tps": 100.0})
            remote = await s.add_server(0, 4)
            to_self = streams_to_self(me.network)
            model = await own_client(s, me, spot_check=SpotCheckConfig(fraction=1.0, seed=1))
            await sees(model, 2)
            # as if an earlier session had opened it: only a server reached is believed faster than ours
            model.sequence.note_reached(remote.network.peer_id)
            tokens, route, stats = await greedy(model, PROMPT, 8)
            assert tokens == want and route == [(remote.network.peer_id, 0, 4)]
            checks = stats.spot_checks
            assert checks["passed"] == checks["checks"] > 0 and checks["unchecked"] == 0
            assert me.server.stats["sessions_opened"] == 1  # the checker session, in process
            assert to_self == []
            # with our blocks in the route, no step is checked: nobody checks us against ourselves
            model.sequence.ban(remote.network.peer_id, "test: route through our own blocks")
            tokens, route, stats = await greedy(model, PROMPT, 8)
            assert tokens == want and route == [(me.network.peer_id, 0, 4)]
            assert stats.spot_checks["checks"] == 0 and remote.server.stats["sessions_opened"] == 1


async def test_our_session_ending_is_replayed_there_then_a_fault_recovered_elsewhere(llama):
    """Our server drops the session (idle expiry, displacement, a move): no fault the first time — the
    history is replayed on a fresh session there; the second time the server is banned and the history
    replayed on a remote server. The output stays the local model's."""
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 12)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4), (0, 4)], model_id=mid) as s:
            me, remote = s.servers
            model = await own_client(s, me, step_timeout=5.0)
            await sees(model, 2)
            tokens, g = [], None
            async for ev in model.stream(PROMPT, max_new_tokens=12, stop_token_ids=[]):
                if isinstance(ev, Finished):
                    g = ev.generation
                    continue
                tokens.append(ev.token_id)
                if ev.index in (4, 8):
                    assert ev.route == [(me.network.peer_id, 0, 4)]
                    for session in list(me.server.sessions.values()):
                        session.scope.cancel()  # what expiry does
            assert tokens == want and g is not None
            assert g.recoveries == 2 and g.route == [(remote.network.peer_id, 0, 4)]
            assert not me.server.sessions and me.server.cache_used == 0


async def test_billed_peer_pays_only_the_remote_hop(llama, tmp_path):
    path, mid, local = llama
    cfg = local.cfg
    want = local.generate_greedy(PROMPT, 8)
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            me = await add_server(s, 0, 2, mid=mid, cfg=cfg)
            remote = await add_server(s, 2, 4, mid=mid, cfg=cfg)
            model = await own_client(s, me, billing=ClientBilling(me.ledger))
            await sees(model, 2)
            g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == want
            assert [p for p, _, _ in g.route] == [me.network.peer_id, remote.network.peer_id]
            assert me.server.billing.stats["admitted"] == 0  # our own session has no account
            spends = latest_receipts(me.ledger, me.ledger.me, "spend")
            assert [r.server for r in spends.values()] == [remote.ledger.me]
            assert next(iter(spends.values())).tokens == len(PROMPT) + 7
