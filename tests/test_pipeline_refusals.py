"""A refusal is not a fault: a server that refuses (too long, cache full) is not banned, the client
fails at once with the typed refusal and its usable limit, and the next request is served at once;
a server that faulted and restarted is routed to again as soon as its new announcement is seen."""

import pytest
import trio

from pipeline.errors import CacheFull, GenerationFailed, TooLong
from pipeline.protocol import InferenceError
from pipeline.server import BlockServer, ServerConfig
from testkit.swarms import FIXED_TP, swarm

PROMPT = [5, 17, 42, 8, 99, 3]
LONG = [(7 * i) % 100 for i in range(50)]
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 blocks, 2 kv heads, head_dim 16, float32


@pytest.mark.parametrize("refusal, server_cfg, limit", [
    (CacheFull, {"cache_budget_bytes": 32 * KV_BYTES_PER_TOKEN}, 32),
    (TooLong, {"max_length": 40}, 40),
], ids=["cache-full", "too-long"])
async def test_refused_everywhere_is_typed_and_bans_nobody(llama, refusal, server_cfg, limit):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 4)
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 4), (0, 4)], model_id=mid, **server_cfg) as s:
            model = await s.client()
            with pytest.raises(refusal) as refused:
                await model.generate(LONG, max_new_tokens=10, stop_token_ids=[])
            assert refused.value.limit == limit
            assert isinstance(refused.value.__cause__, InferenceError)  # the server's reply, kept
            assert sum(p.server.stats["sessions_refused"] for p in s.servers) >= (2 if refusal is CacheFull else 0)
            assert not model.sequence.banned()
            t0 = trio.current_time()
            g = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert g.token_ids == want
            assert trio.current_time() - t0 < 5.0


async def test_restarted_server_is_used_again_after_its_announcement(llama):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 4)
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            peer = await s._peer(client_mode=False)
            s.servers.append(peer)

            async def serve(task_status=trio.TASK_STATUS_IGNORED):
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        server = BlockServer(peer.network, peer.dht, path, 0, 4, model_id=mid,
                                             config=ServerConfig(throughput=FIXED_TP, announce_period=5.0))
                        await nursery.start(server.run)
                        task_status.started((server, scope))

            peer.server, scope = await peer.nursery.start(serve)
            model = await s.client(step_timeout=5.0)
            assert (await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])).token_ids == want
            with pytest.raises(GenerationFailed):
                async with model.inference_session(16) as session:
                    await session.step(await model.embed(PROMPT))
                    scope.cancel()  # the server stops under the open session, saying so (SessionExpired)
                    await trio.sleep(0.5)
                    await session.step(await model.embed([1]))
            me = peer.network.peer_id
            assert me not in model.sequence.banned()  # a session its server ended is no fault the first time
            model.sequence.ban(me, "a fault")  # as a crash mid-step would (tests/test_bad_day.py: SIGKILL)
            assert me in model.sequence.banned()
            banned_at = trio.current_time()
            peer.server, scope = await peer.nursery.start(serve)  # same identity, a new start
            g = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert g.token_ids == want
            assert trio.current_time() - banned_at < model.sequence.ban_base  # the ban was lifted, not waited out
            assert me not in model.sequence.banned()
