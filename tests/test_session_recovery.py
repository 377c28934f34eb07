"""A session its server ended (expired, displaced) is rebuilt on another server where one serves its
blocks — the server that ended it is not paid again for the replay, and is not banned — and a rebuild
the caller leaves mid-replay (an HTTP client gone) closes the sessions it opened and releases their load."""

import pytest
import trio

from pipeline import protocol as proto
from pipeline.client import DistributedModel, Finished
from pipeline.errors import GenerationFailed
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
FAST = {"decode_tps": 10000.0, "prefill_tps": 100000.0}  # ten times testkit.swarms.FIXED_TP: routes go here first


async def fast_and_slow(s) -> tuple:
    fast = await s.add_server(0, 4, throughput=FAST)
    slow = await s.add_server(0, 4)
    return fast, slow


async def client(s, servers) -> DistributedModel:
    """A client that has reached both `servers` (so routes weigh what they announce: the fast one first)."""
    model = await s.client(step_timeout=5.0, spot_check=None)
    with trio.fail_after(20):
        while len(await model.sequence.refresh(force=True)) < len(servers):
            await trio.sleep(0.05)
        for peer in servers:
            await model.network.connect(peer.network.listen_addrs()[0])
            model.sequence.note_reached(peer.network.peer_id)  # as if earlier sessions had opened it
    return model


def expire(server) -> None:
    for session in list(server.sessions.values()):
        session.scope.cancel()  # what expiry does


async def test_a_session_a_server_ended_is_replayed_elsewhere_without_a_ban(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 10)
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            fast, slow = await fast_and_slow(s)
            model = await client(s, (fast, slow))
            tokens, g = [], None
            async for ev in model.stream(PROMPT, max_new_tokens=10, stop_token_ids=[]):
                if isinstance(ev, Finished):
                    g = ev.generation
                    continue
                tokens.append(ev.token_id)
                if ev.index == 4:
                    assert ev.route == [(fast.network.peer_id, 0, 4)]
                    expire(fast.server)
            assert tokens == want and g is not None
            # still the best server, but not the one to pay for the replay
            assert g.recoveries == 1 and g.route == [(slow.network.peer_id, 0, 4)]
            assert fast.server.stats["sessions_opened"] == 1 and not model.sequence.banned()
            # the next generation may route there again
            again = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert again.token_ids == want[:4] and again.route == [(fast.network.peer_id, 0, 4)]


async def test_a_rebuild_cancelled_mid_replay_closes_what_it_opened(llama):
    path, mid, local = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            fast, slow = await fast_and_slow(s)
            model = await client(s, (fast, slow))
            replays = []
            with trio.CancelScope() as caller:
                async with model.inference_session(16) as session:
                    h = await session.step(await model.embed(PROMPT))
                    assert session.route == [(fast.network.peer_id, 0, 4)]
                    expire(fast.server)
                    run_route_hop = session._run_route_hop

                    async def replaying(hop, h, pos, chunks=None):
                        if chunks is not None:  # the history, replayed on the new hop: the caller leaves now
                            replays.append(hop.peer_id)
                            caller.cancel()
                        return await run_route_hop(hop, h, pos, chunks)

                    session._run_route_hop = replaying
                    token = int((await model.logits(h[:, -1:]))[0, -1].argmax())
                    await session.step(await model.embed([token]))
            assert caller.cancelled_caught and replays == [slow.network.peer_id]
            assert model.sequence.held == {}
            with trio.fail_after(5):
                while fast.server.sessions or slow.server.sessions:
                    await trio.sleep(0.05)
            assert fast.server.cache_used == slow.server.cache_used == 0


def displace(server) -> None:
    for session in list(server.sessions.values()):
        session.end_kind = proto.DISPLACED  # what displacement tells the client
        session.scope.cancel()


async def test_a_server_that_ends_a_session_twice_is_banned_not_paid_again_and_again(llama):
    """The only server of a span displaces the session twice: the first is forgiven (replayed there: no
    other route), the second is a fault — else it could bill a replay of the whole history at every step."""
    path, mid, local = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            only = await s.add_server(0, 4)
            model = await client(s, (only,))
            ended = 0
            with pytest.raises(GenerationFailed):
                async for ev in model.stream(PROMPT, max_new_tokens=10, stop_token_ids=[]):
                    if not isinstance(ev, Finished) and ev.index in (2, 5):
                        displace(only.server)
                        ended += 1
            assert ended == 2 and only.network.peer_id in model.sequence.banned()
            assert only.server.stats["sessions_opened"] == 2  # one replay paid, not one a step
