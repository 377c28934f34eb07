"""Hostile or broken session messages get clear errors; the server keeps serving everyone else.
Also: the cache budget (CacheFull), idle expiry, clean shutdown announces 'offline'."""

import numpy as np
import pytest
import torch
import trio

from p2p import tensor as wire
from p2p.errors import P2PError
from pipeline import protocol as proto
from pipeline.announce import fetch_servers
from pipeline.protocol import pack_hidden
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]
H = 64


async def raw_stream(s, server):
    client = s.clients[-1] if s.clients else None
    if client is None:
        await s.client()
        client = s.clients[-1]
    net = client.network
    net.add_address(server.network.peer_id, server.network.listen_addrs()[0])
    return await net.open_stream(server.network.peer_id, proto.INFERENCE)


async def ask(stream, msg) -> dict:
    await stream.send(msg)
    with trio.fail_after(5):
        return await stream.receive()


def open_msg(mid, a=0, b=2, max_length=8, dtype="float32"):
    return {"t": "open", "model": mid, "start": a, "end": b, "max_length": max_length, "dtype": dtype}


def step_msg(h, pos=0, i=1):
    return {"t": "step", "id": i, "pos": pos, "h": h}


@pytest.mark.parametrize("backend", ["sim", "libp2p"])
async def test_hostile_requests_get_clear_errors(llama, backend):
    path, mid, local = llama
    want = local.generate_greedy(PROMPT, 8)
    with trio.fail_after(60):
        async with swarm(backend, path, [(0, 2), (2, 4)], model_id=mid) as s:
            server = s.servers[0]
            st = await raw_stream(s, server)
            x = torch.randn(1, 3, H)

            async def refused(msg, kind, match=""):
                reply = await ask(st, msg)
                assert reply["t"] == "error" and reply["kind"] == kind, reply
                assert match in reply["m"], reply

            await refused(step_msg(pack_hidden(x)), "NoSession", "open")
            await refused(42, "BadRequest", "must be a map")
            await refused({"t": "nope"}, "BadRequest", "unknown message type")
            await refused(open_msg("ab" * 32), "ModelMismatch")
            await refused(open_msg(mid, 0, 9), "BadRequest", "outside")
            await refused(open_msg(mid, 2, 4), "SpanNotServed", "[0, 2)")
            await refused(open_msg(mid, 1, 1), "SpanNotServed")
            await refused(open_msg(mid, max_length=0), "BadMaxLength")
            await refused(open_msg(mid, max_length=10**9), "BadMaxLength")
            await refused(open_msg(mid, dtype="bfloat16"), "DtypeMismatch", "float32")
            await refused({**open_msg(mid), "max_length": "8"}, "BadRequest", "max_length")
            opened = await ask(st, open_msg(mid, 1, 2))  # a sub-span of the served [0, 2)
            assert opened["t"] == "opened" and (opened["start"], opened["end"]) == (1, 2)
            await refused(open_msg(mid), "SessionOpen")

            await refused(step_msg(pack_hidden(torch.randn(1, 3, 32))), "BadRequest", f"[1, tokens, {H}]")
            await refused(step_msg(pack_hidden(torch.randn(2, 3, H))), "BadRequest", "shape")
            await refused(step_msg(pack_hidden(x.to(torch.bfloat16))), "BadRequest", "dtype bfloat16")
            await refused(step_msg(wire.pack(np.zeros((1, 3, H), dtype=np.int32))), "BadRequest", "int32")
            bad = pack_hidden(x)
            await refused(step_msg({**bad, "data": bad["data"][:-4]}), "BadRequest", "bytes")
            await refused(step_msg(pack_hidden(torch.randn(1, 0, H))), "BadRequest", "at least one token")
            await refused(step_msg(pack_hidden(x), pos=5), "BadPosition", "past")
            await refused({**step_msg(pack_hidden(x)), "chunks": [1, 1]}, "BadRequest", "chunks")
            await refused({**step_msg(pack_hidden(x)), "push": "x"}, "BadRequest", "push")
            ok = await ask(st, step_msg(pack_hidden(x), i=2))
            assert ok["t"] == "out" and ok["id"] == 2
            await refused(step_msg(pack_hidden(torch.randn(1, 6, H)), pos=3, i=3), "MaxLengthExceeded", "max_length of 8")
            await refused(step_msg(pack_hidden(x), pos=3, i=1), "StaleStep")
            # a garbage frame kills only this stream
            await st.aclose()

            # ... and the server still serves a real client correctly
            model = await s.client()
            g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == want
            assert server.server.stats["errors"] >= 20


async def test_cache_budget_expiry_and_offline(llama):
    path, mid, local = llama
    # 2 blocks × 2 (k, v) × 2 kv heads × 16 dims × 4 bytes = 512 bytes per token; 64 tokens = 32 KiB a session
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 2), (2, 4)], model_id=mid, cache_budget_bytes=70_000,
                         session_timeout=0.5, cache_share=1.0, strangers_cache_share=1.0) as s:  # one client may fill it (shares: test_server_hostile)
            server = s.servers[0]
            streams = [await raw_stream(s, server) for _ in range(3)]
            assert (await ask(streams[0], open_msg(mid, max_length=64)))["t"] == "opened"
            second = await ask(streams[1], open_msg(mid, max_length=64))
            assert second["t"] == "opened" and second["cache_tokens_left"] == (70_000 - 2 * 32768) // 512
            full = await ask(streams[2], open_msg(mid, max_length=64))
            assert full["kind"] == "CacheFull" and "budget" in full["m"]
            assert server.server.info().cache_tokens == (70_000 - 2 * 32768) // 512
            # idle sessions expire and free their cache
            with trio.fail_after(5):
                while server.server.sessions:
                    await trio.sleep(0.05)
            assert server.server.cache_used == 0 and server.server.stats["expired"] == 2
            msg = await streams[0].receive()
            assert msg["kind"] == "SessionExpired"
            with pytest.raises(P2PError):
                await streams[0].receive()
            assert (await ask(streams[2], open_msg(mid, max_length=64)))["t"] == "opened"

            # announcements: both online; a clean shutdown turns one 'offline'
            model = await s.client()
            online = await fetch_servers(model.dht, mid)
            assert {x.peer_id for x in online} == {p.network.peer_id for p in s.servers}
            assert all(x.decode_tps == 1000.0 and x.version and x.addrs for x in online)
            server.scope.cancel()
            await server.done.wait()
            everyone = await fetch_servers(s.servers[1].dht, mid, online_only=False)
            states = {x.peer_id: x.state for x in everyone}
            assert states[server.network.peer_id] == "offline"
            assert states[s.servers[1].network.peer_id] == "online"
