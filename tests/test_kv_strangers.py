"""KV cache for clients without standing (issue #13): one such key holds at most `cache_share` of the budget
and at most `stranger_cache_tokens` of the span; all of them together (Sybil keys too) at most
`strangers_cache_tokens` and `strangers_cache_share` of the budget; clients with standing keep the rest.
The defaults hold a long session of the default model and of an 8B-class one. Idle strangers give way:
they expire after `stranger_idle_timeout`, and a newcomer the pool refuses displaces the longest-idle
ones (never one that keeps stepping, nor one between a generation's steps); a displaced client re-opens,
and bans nobody."""

from contextlib import AsyncExitStack

import pytest
import torch
import trio

from credits import CreditPolicy, StandingView
from p2p.identity import Identity
from p2p.libp2p import Libp2pNetwork
from pipeline import protocol as proto
from pipeline import convert
from pipeline.billing import ClientBilling, ServerBilling
from pipeline.client import ClientConfig, DistributedModel
from pipeline.config import ModelConfig
from pipeline.errors import CacheFull
from pipeline.identity import model_id
from pipeline.loading import ModelFolder
from pipeline.model import KVCache
from pipeline.server import BlockServer, ServerConfig, StrangerCaps
from potluck.cli import build_parser
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


async def _billed_server(s, path, mid, cfg, *, strangers_tokens: int, stranger_tokens: int = 16,
                         authority: bool = False, **server_cfg):
    """A billing server of all 4 blocks with a 256-token cache: `stranger_tokens` for one stranger,
    `strangers_tokens` for all strangers; its own key a grant authority when `authority` (to give clients standing)."""
    per = KV_BYTES_PER_TOKEN
    peer = await s._peer(client_mode=False)
    authorities = frozenset([peer.network.identity.public_key]) if authority else frozenset()
    peer.ledger = make_ledger(peer.network.identity, None, mid, cfg,
                              CreditPolicy(starting_grant=0, debt_limit=10**12, grant_authorities=authorities))
    conf = ServerConfig(throughput=FIXED_TP, announce_period=5.0, cache_budget_bytes=256 * per,
                        initial_cache_tokens=4, stranger_cache_tokens=stranger_tokens,
                        strangers_cache_tokens=strangers_tokens, **server_cfg)
    server = peer.server = BlockServer(peer.network, peer.dht, path, 0, 4, config=conf, model_id=mid,
                                       billing=ServerBilling(peer.ledger, standing=StandingView(peer.ledger, max_age=0)))
    await peer.nursery.start(server.run)
    s.servers.append(peer)
    assert server.stranger_caps == StrangerCaps(stranger_tokens * per, strangers_tokens * per)  # tokens of the span
    return peer, server


async def _billed_client(s, peer, path, mid, cfg):
    """A client without standing at `peer`'s server (no spot checks: one server)."""
    p = await s._peer(client_mode=True)
    p.ledger = make_ledger(p.network.identity, None, mid, cfg, peer.ledger.policy)
    s.clients.append(p)
    return await DistributedModel.from_pretrained(
        path, p.network, p.dht, model_id=mid,
        config=ClientConfig(billing=ClientBilling(p.ledger), spot_check=None, step_timeout=10.0))


async def _raw_open(s, peer, mid, cfg, max_length):
    """A fresh key's "open" on its own stream: (the stream, the reply)."""
    p = await s._peer(client_mode=True)
    p.ledger = make_ledger(p.network.identity, None, mid, cfg, peer.ledger.policy)
    p.network.add_address(peer.network.peer_id, peer.network.listen_addrs()[0])
    stream = await p.network.open_stream(peer.network.peer_id, proto.INFERENCE)
    await stream.send({"t": "open", "model": mid, "start": 0, "end": 4, "max_length": max_length, "dtype": "float32"})
    with trio.fail_after(5):
        return stream, await stream.receive()


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
    caps = StrangerCaps.of(conf, KVCache.bytes_for(mc, mc.num_layers, 1))
    # a normal generation: a chat prompt of a few hundred tokens and the API's default max_tokens, all
    # blocks on one server, float32 (the most a session of it can take)
    normal = KVCache.bytes_for(mc, mc.num_layers, 400 + DEFAULT_MAX_TOKENS)
    assert normal <= min(caps.per_client, caps.pool)
    # a hog's keys together hold at most half of what the volunteer gave the cache: the rest is standing's
    assert caps.pool <= conf.cache_budget_bytes // 2
    print(f"\nSmolLM2, 30 blocks, float32: {normal / 2**20:.1f} MiB for {400 + DEFAULT_MAX_TOKENS} tokens; "
          f"a stranger may hold {caps.per_client >> 20} MiB, all strangers {caps.pool >> 20} MiB")


def test_stranger_caps_are_tokens_of_the_span_within_fractions_of_the_budget():
    # an 8B-class model (Llama-3-8B's shape): 32 blocks of 8 kv heads × 128, float16 — 128 KiB a token,
    # where a fixed 32 MiB held a newcomer to 256 tokens
    big = ModelConfig(family="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=8192,
                      tie_word_embeddings=False, qkv_bias=False, o_bias=False, mlp_bias=False)
    per = KVCache.bytes_for(big, big.num_layers, 1, dtype=torch.float16)
    assert per == 128 << 10
    # a volunteer serving it gives its cache gigabytes: a stranger gets a long session, the pool a few
    conf = ServerConfig(cache_budget_bytes=8 << 30)
    caps = StrangerCaps.of(conf, per)
    assert caps.per_client // per == conf.stranger_cache_tokens >= 4096
    assert caps.pool // per == conf.strangers_cache_tokens >= 4 * conf.stranger_cache_tokens
    # a small volunteer (the default 256 MiB) is not taken over: the budget's fractions bound the tokens
    small = ServerConfig()
    caps = StrangerCaps.of(small, per)
    assert caps.per_client == small.cache_budget_bytes * small.cache_share == 1024 * per
    assert caps.pool == small.cache_budget_bytes * small.strangers_cache_share


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


async def test_a_strangers_booking_is_accounting_its_memory_follows_its_paid_steps(llama):
    """A stranger's "open" books its whole max length in the pool but allocates only
    `stranger_open_cache_tokens`: idle sessions of fresh keys (a KV hog) reserve room, not the server's
    RAM. A stranger's generation grows its cache with its steps and its answer is unchanged."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 10)
    per = KV_BYTES_PER_TOKEN
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            peer, server = await _billed_server(s, path, mid, cfg, strangers_tokens=40, stranger_open_cache_tokens=2)
            streams = []
            for _ in range(2):
                stream, reply = await _raw_open(s, peer, mid, cfg, 16)
                assert reply["t"] == "opened"
                streams.append(stream)
            booked = [x.nbytes for x in server.sessions.values()]
            allocated = [x.cache.nbytes for x in server.sessions.values()]
            assert booked == [16 * per] * 2 and allocated == [2 * per] * 2
            for stream in streams:
                await stream.aclose()
            model = await _billed_client(s, peer, path, mid, cfg)
            async with model.inference_session(len(PROMPT) + 10):
                with trio.fail_after(5):
                    while len(server.sessions) != 1:  # the raw sessions' closes are read
                        await trio.sleep(0.02)
                assert [(x.nbytes, x.cache.nbytes) for x in server.sessions.values()] == [(16 * per, 2 * per)]
            # its cache grows from 2 tokens with the steps (a prompt of 6 and 10 new tokens)
            g = await model.generate(PROMPT, max_new_tokens=10, stop_token_ids=[])
            assert g.token_ids == want


async def test_idle_strangers_give_way_to_a_newcomer_and_one_that_keeps_stepping_keeps_its_share(llama):
    """Keys without standing holding the strangers' pool with idle sessions lock nobody out: a newcomer
    the pool refuses displaces the longest-idle one — one that never stepped once idle
    `displace_idle_after`, one that stepped (a generation between its steps on a slow route) only once
    idle `stranger_displace_idle_after`; a stranger that keeps stepping is never displaced; a displaced
    client is told so (Displaced), re-opens (no ban) and goes on."""
    path, mid, local, cfg = llama
    want = local.generate_greedy(PROMPT, 24)
    per = KV_BYTES_PER_TOKEN
    idle_after, stepped_idle_after = 1.0, 3.0
    with trio.fail_after(90):
        async with swarm("sim", path, [], model_id=mid) as s:
            peer, server = await _billed_server(s, path, mid, cfg, strangers_tokens=72, stranger_tokens=32,
                                                displace_idle_after=idle_after,
                                                stranger_displace_idle_after=stepped_idle_after)
            active, idler = [await _billed_client(s, peer, path, mid, cfg) for _ in range(2)]
            stepping = trio.Event()
            stop = trio.Event()

            async def keep_stepping(task_status=trio.TASK_STATUS_IGNORED):
                """Greedy decoding, a token every 0.3 s (far more often than `idle_after`) until told to stop."""
                tokens: list[int] = []
                async with active.inference_session(32) as session:
                    h = await session.step(await active.embed(PROMPT))
                    task_status.started()
                    while not stop.is_set() and len(PROMPT) + len(tokens) < 32:
                        tokens.append(int((await active.logits(h[:, -1:]))[0, -1].argmax()))
                        h = await session.step(await active.embed(tokens[-1:]))
                        await trio.sleep(0.3)
                assert tokens == want[:len(tokens)] and len(tokens) >= 10
                assert session.stats.recoveries == 0  # never displaced
                stepping.set()

            async with trio.open_nursery() as nursery:
                await nursery.start(keep_stepping)
                async with idler.inference_session(32) as parked:
                    h = await parked.step(await idler.embed(PROMPT))  # then idles
                    _, small = await _raw_open(s, peer, mid, cfg, 8)  # another idle key: the pool is full
                    assert small["t"] == "opened"
                    assert sum(x.nbytes for x in server.sessions.values()) == 72 * per
                    # while they are fresh, a newcomer is refused, typed
                    _, early = await _raw_open(s, peer, mid, cfg, 32)
                    assert early["kind"] == "CacheFull" and server.stats["displaced"] == 0
                    await trio.sleep(idle_after + 0.5)
                    # idle between steps is no reason to end a generation: only the never-stepped key (8) gives way
                    _, between = await _raw_open(s, peer, mid, cfg, 32)
                    assert between["kind"] == "CacheFull" and between["limit"] == 8 and server.stats["displaced"] == 0
                    await trio.sleep(stepped_idle_after - idle_after)
                    # idle past a generation's gap, the newcomer displaces the longest-idle session (the parked one) ...
                    _, newcomer = await _raw_open(s, peer, mid, cfg, 32)
                    assert newcomer["t"] == "opened" and server.stats["displaced"] == 1
                    assert parked.hops[0].session_id not in server.sessions
                    # ... and never one that keeps stepping: past the idle 8 tokens the pool refuses
                    _, late = await _raw_open(s, peer, mid, cfg, 16)
                    assert late["kind"] == "CacheFull" and late["limit"] == 8 and server.stats["displaced"] == 1
                    stop.set()
                    with trio.fail_after(10):
                        await stepping.wait()
                    # the displaced client steps on: its server ended the session, it re-opens and replays
                    token = int((await idler.logits(h[:, -1:]))[0, -1].argmax())
                    h = await parked.step(await idler.embed([token]))
                    assert [token, int((await idler.logits(h[:, -1:]))[0, -1].argmax())] == want[:2]
                    assert parked.stats.recoveries == 1 and not idler.sequence.banned()


async def test_idle_stranger_sessions_expire_after_their_own_short_timeout(llama):
    path, mid, local, cfg = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            peer, server = await _billed_server(s, path, mid, cfg, strangers_tokens=40, stranger_idle_timeout=1.0,
                                                session_timeout=60.0)
            own = await server.open_local(mid, 0, 4, 8, "float32")  # this peer's own client has standing
            stream, opened = await _raw_open(s, peer, mid, cfg, 8)
            assert opened["t"] == "opened"
            with trio.fail_after(5):  # not first_step_timeout (20 s), not session_timeout
                assert (await stream.receive())["kind"] == "SessionExpired"
            assert list(server.sessions) == [own.id] and server.stats["expired"] == 1
            own.close()


def test_serve_flags_state_the_servers_defaults(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    raw = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    text = " ".join(raw.split())
    conf = ServerConfig()
    assert f"hold (default {conf.stranger_cache_tokens};" in text and f"(default {conf.strangers_cache_tokens};" in text


@pytest.mark.slow
def test_a_serve_process_holds_strangers_to_its_token_flags_and_idle_ones_give_way(spawn, llama_folder):
    """`potluck serve --stranger-cache-tokens 16 --strangers-cache-tokens 24`: a fresh key's session of 17
    tokens is refused (CacheFull, limit 16); a second key finds 8 left; once the first key's session is
    idle (it never stepped), a third key's session displaces it (its stream says Displaced)."""
    proc = spawn("--model", str(llama_folder), "--threads", "1", "--blocks", "0:4", "--cache-mb", "4",
                 "--stranger-cache-tokens", "16", "--strangers-cache-tokens", "24")
    status = proc.call("status")["server"]
    per = KV_BYTES_PER_TOKEN
    assert (status["stranger_cache_bytes"], status["strangers_cache_bytes"]) == (16 * per, 24 * per)
    mid = model_id(llama_folder)

    async def open_session(stack: AsyncExitStack, max_length: int):
        """A fresh key's "open" at the process: (its stream, the reply)."""
        net = await stack.enter_async_context(Libp2pNetwork.open(Identity.generate(), ["/ip4/127.0.0.1/tcp/0"]))
        await net.connect(proc.addr, timeout=10)
        stream = await net.open_stream(proc.addr.rsplit("/", 1)[1], proto.INFERENCE)
        await stream.send({"t": "open", "model": mid, "start": 0, "end": 4, "max_length": max_length,
                           "dtype": "float32"})
        with trio.fail_after(10):
            return stream, await stream.receive()

    async def keys() -> None:
        with trio.fail_after(60):
            async with AsyncExitStack() as stack:
                _, too_long = await open_session(stack, 17)
                assert too_long["kind"] == "CacheFull" and too_long["limit"] == 16
                first, opened = await open_session(stack, 16)
                assert opened["t"] == "opened"
                _, second = await open_session(stack, 16)
                assert second["kind"] == "CacheFull" and second["limit"] == 8
                await trio.sleep(ServerConfig().displace_idle_after + 0.5)
                _, third = await open_session(stack, 16)
                assert third["t"] == "opened"
                assert (await first.receive())["kind"] == "Displaced"

    trio.run(keys)
    assert proc.call("status")["server"]["displaced"] == 1
