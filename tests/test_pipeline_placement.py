"""--blocks auto: how many blocks fit, which window the swarm lacks, rebalancing when a replica leaves;
measured throughput is announced."""

import pytest
import torch
import trio

from pipeline.announce import fetch_servers
from pipeline.loading import ModelFolder
from pipeline.server import block_bytes, parse_blocks
from testkit.swarms import swarm

PROMPT = [5, 17, 42, 8, 99, 3]


def test_parse_blocks():
    assert parse_blocks("auto") == (None, None)
    assert parse_blocks("3:7", 30) == (3, 7)
    for bad in ["7:3", "x", "0:31", "-1:2"]:
        with pytest.raises(ValueError):
            parse_blocks(bad, 30)


async def test_auto_placement_and_rebalance(llama):
    path, mid, local = llama
    per_block = block_bytes(ModelFolder(path), 0, torch.float32)
    budget = 1 << 20
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            # memory for 2.5 blocks + the cache budget → 2 blocks, at the uncovered start
            a = await s.add_server(None, None, memory_budget_bytes=budget + int(2.5 * per_block), cache_budget_bytes=budget)
            assert (a.server.start, a.server.end) == (0, 2)
            b = await s.add_server(None, None, num_blocks=2)
            assert (b.server.start, b.server.end) == (2, 4)  # the window nobody serves
            c = await s.add_server(None, None, num_blocks=2)
            assert (c.server.start, c.server.end) == (0, 2)  # evenly covered: the first window
            assert not await c.server.rebalance_once()  # the swarm is balanced enough
            # b leaves cleanly: blocks 2..3 are uncovered; c moves there
            b.scope.cancel()
            await b.done.wait()
            assert await c.server.rebalance_once()
            assert (c.server.start, c.server.end) == (2, 4)
            online = await fetch_servers(s.servers[0].dht, mid)
            assert sorted((x.start, x.end) for x in online) == [(0, 2), (2, 4)]
            model = await s.client()
            g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == local.generate_greedy(PROMPT, 8)


async def test_throughput_is_measured_and_announced(llama):
    path, mid, local = llama
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            p = await s.add_server(1, 3, throughput=None)
            tp = p.server.throughput
            assert tp["decode_tps"] > 0 and tp["prefill_tps"] > 0
            [info] = await fetch_servers(p.dht, mid)
            assert (info.start, info.end) == (1, 3) and info.decode_tps == pytest.approx(tp["decode_tps"])
            assert info.cache_tokens > 0 and info.dtype == "float32"


async def test_auto_placement_doubles_the_single_replica_blocks_first(llama):
    path, mid, local = llama
    slow = {"decode_tps": 10.0, "prefill_tps": 100.0}
    with trio.fail_after(60):
        async with swarm("sim", path, [], model_id=mid) as s:
            for _ in range(3):
                await s.add_server(0, 2, throughput=slow)
            fast = await s.add_server(2, 4)  # one replica with more throughput than the three slow ones together
            new = await s.add_server(None, None, num_blocks=2, throughput=slow)
            assert (new.server.start, new.server.end) == (2, 4)  # the throughput rule alone would pick 0..2
            spare = s.servers[2]
            assert not await spare.server.rebalance_once()  # every block has 2 replicas; moving lowers the minimum
            fast.scope.cancel()
            await fast.done.wait()
            assert await spare.server.rebalance_once()  # 2..3 are back to one replica: a third of 0..2 moves there
            assert (spare.server.start, spare.server.end) == (2, 4)
            online = await fetch_servers(s.servers[0].dht, mid)
            assert sorted((x.start, x.end) for x in online) == [(0, 2), (0, 2), (2, 4), (2, 4)]
            model = await s.client()
            g = await model.generate(PROMPT, max_new_tokens=8, stop_token_ids=[])
            assert g.token_ids == local.generate_greedy(PROMPT, 8)
