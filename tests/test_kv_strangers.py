"""KV cache for clients without standing (issue #13): one such key holds at most `cache_share` of the budget
and at most `stranger_cache_bytes`; all of them together (Sybil keys too) at most `strangers_cache_bytes`;
clients with standing keep the rest. The defaults hold a normal generation of the default model."""

import pytest
import trio

from credits import CreditPolicy, StandingView
from pipeline import protocol as proto
from pipeline import convert
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.client import ClientConfig, DistributedModel
from pipeline.config import ModelConfig
from pipeline.errors import CacheFull
from pipeline.loading import ModelFolder
from pipeline.model import KVCache
from pipeline.server import BlockServer, ServerConfig
from potluck.openai_schema import DEFAULT_MAX_TOKENS
from testkit.billing import give_standing, make_ledger
from testkit.models import have_default_model_wheel
from testkit.swarms import FIXED_TP, swarm

PROMPT = [5, 17, 42, 8, 99, 3]
KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 16 * 4  # K and V, 4 blocks, 2 kv heads, head_dim 16, float32 (the tiny Llama)


@pytest.fixture(scope="module")
def llama(llama):
    path, mid, local = llama
    return path, mid, local, ModelFolder(path).config


async def _billed_server(s, path, mid, cfg, *, strangers_tokens: int, authority: bool = False):
    """A billing server of all 4 blocks with a 256-token cache: 16 tokens for one stranger, `strangers_tokens`
    for all strangers; its own key a grant authority when `authority` (to give clients standing)."""
    per = KV_BYTES_PER_TOKEN
    peer = await s._peer(client_mode=False)
    authorities = frozenset([peer.network.identity.public_key]) if authority else frozenset()
    peer.ledger = make_ledger(peer.network.identity, None, mid, cfg,
                              CreditPolicy(starting_grant=0, debt_limit=10**12, grant_authorities=authorities))
    conf = ServerConfig(throughput=FIXED_TP, announce_period=5.0, cache_budget_bytes=256 * per,
                        initial_cache_tokens=4, stranger_cache_bytes=16 * per,
                        strangers_cache_bytes=strangers_tokens * per)
    server = peer.server = BlockServer(peer.network, peer.dht, path, 0, 4, config=conf, model_id=mid,
                                       billing=ServerBilling(peer.ledger, standing=StandingView(peer.ledger, max_age=0)))
    await peer.nursery.start(server.run)
    s.servers.append(peer)
    return peer, server


async def test_strangers_hold_a_bounded_slice_and_standing_keeps_the_rest(llama):
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 4)
    per = KV_BYTES_PER_TOKEN
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            # a fraction alone (half of 256 tokens) would let one key hold 128 tokens, two keys all of it
            peer, server = await _billed_server(s, path, mid, cfg, strangers_tokens=40, authority=True)

            async def stranger():
                p = await s._peer(client_mode=True)
                p.ledger = make_ledger(p.network.identity, None, mid, cfg, peer.ledger.policy)
                p.network.add_address(peer.network.peer_id, peer.network.listen_addrs()[0])
                return p

            async def ask_open(p, max_length):
                stream = await p.network.open_stream(peer.network.peer_id, proto.INFERENCE)
                await stream.send({"t": "open", "model": mid, "start": 0, "end": 4, "max_length": max_length,
                                   "dtype": "float32"})
                with trio.fail_after(5):
                    return stream, await stream.receive()

            def held(p=None):
                return sum(x.nbytes for x in server.sessions.values()
                           if (x.peer_id == p.network.peer_id if p else not x.standing))

            mallory = await stranger()
            _, too_long = await ask_open(mallory, 17)  # longer than one stranger's bytes
            assert too_long["kind"] == "CacheFull" and too_long["limit"] == 16
            streams = []
            while True:
                stream, reply = await ask_open(mallory, 4)
                if reply["t"] != "opened":
                    break
                streams.append(stream)
            assert reply["kind"] == "CacheFull" and held(mallory) == 16 * per
            # more keys: together, strangers hold no more than their slice
            for _ in range(3):
                sybil = await stranger()
                while (await ask_open(sybil, 4))[1]["t"] == "opened":
                    pass
            assert held() == 40 * per
            print(f"\nstrangers hold {held()} of {server.config.cache_budget_bytes} bytes; one key {held(mallory)}")
            # a client with standing (its work reached this server) is not held to their slice
            rich = await s._peer(client_mode=True)
            rich.ledger = make_ledger(rich.network.identity, None, mid, cfg, peer.ledger.policy)
            await give_standing(rich.ledger, peer.ledger, model=mid, start=0, end=4, tokens=10)
            s.clients.append(rich)
            model = await DistributedModel.from_pretrained(
                path, rich.network, rich.dht, model_id=mid,
                config=ClientConfig(billing=ClientBilling(rich.ledger), spot_check=None, step_timeout=10.0))
            session = model.inference_session(64)  # the model's whole context: more than the strangers' slice
            async with session:
                assert held() == 40 * per and server.stats["displaced"] == 0
            g = await model.generate(PROMPT, max_new_tokens=4, stop_token_ids=[])
            assert g.token_ids == want


def test_the_defaults_hold_a_normal_generation_of_the_default_model_and_bound_a_hog(smollm2_data):
    if not have_default_model_wheel():
        pytest.skip(convert.INSTALL_HINT)
    mc = ModelConfig.load(smollm2_data[1])
    conf = ServerConfig()
    # a normal generation: a chat prompt of a few hundred tokens and the API's default max_tokens, all
    # blocks on one server, float32 (the most a session of it can take)
    normal = KVCache.bytes_for(mc, mc.num_layers, 400 + DEFAULT_MAX_TOKENS)
    assert normal <= min(conf.stranger_cache_bytes, conf.cache_share * conf.cache_budget_bytes)
    assert conf.stranger_cache_bytes <= conf.strangers_cache_bytes <= 64 << 20  # the bound on a hog's RSS
    print(f"\nSmolLM2, 30 blocks, float32: {normal / 2**20:.1f} MiB for {400 + DEFAULT_MAX_TOKENS} tokens; "
          f"a stranger may hold {conf.stranger_cache_bytes >> 20} MiB, all strangers {conf.strangers_cache_bytes >> 20} MiB")


async def test_a_stranger_is_refused_at_open_never_mid_generation(llama):
    """Strangers book their whole max_length at open: when two of them do not fit the strangers' pool
    together, the second is refused at "open" (CacheFull), and once there is room it runs to the end."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 10)
    per = KV_BYTES_PER_TOKEN
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            # 18 tokens for all strangers: two sessions of 16 do not fit, one of 16 and one of 4 growing to 16 did
            peer, server = await _billed_server(s, path, mid, cfg, strangers_tokens=18)
            models = []
            for _ in range(2):
                p = await s._peer(client_mode=True)
                p.ledger = make_ledger(p.network.identity, None, mid, cfg, peer.ledger.policy)
                s.clients.append(p)
                models.append(await DistributedModel.from_pretrained(
                    path, p.network, p.dht, model_id=mid,
                    config=ClientConfig(billing=ClientBilling(p.ledger), spot_check=None, step_timeout=10.0)))
            first, second = models
            async with first.inference_session(len(PROMPT) + 10):
                assert [x.nbytes for x in server.sessions.values()] == [16 * per]  # booked at open
                with pytest.raises(CacheFull) as refused:
                    await second.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
                assert refused.value.limit == 2 and server.stats["steps"] == 0  # at open, before any step
            with trio.fail_after(10):
                while server.sessions:
                    await trio.sleep(0.05)
            g = await second.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want
