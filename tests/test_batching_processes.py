"""Continuous batching on real `potluck serve` processes: several clients generating at once through
the same two servers get, each, the tokens a local run gives; the servers did batch their steps (their
status says so) and announce a batched capacity; with `--max-batch 1` nothing is batched."""

import pytest
import trio

from pipeline.identity import model_id
from pipeline.loading import load_local_model
from potluck.localswarm import PeerProcess, wait_until

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 1, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41], [9, 9, 9, 9]]
NEW_TOKENS = 12

pytestmark = pytest.mark.slow


async def _generate_at_once(folder, mid: str, bootstrap: str, prompts: list[list[int]], n: int) -> list[list[int]]:
    """One in-process libp2p client per prompt (its own identity and ledger: the servers bill every
    step), all generating at the same time; their greedy tokens."""
    from credits import Ledger
    from dht.node import DHTNode
    from p2p.identity import Identity
    from p2p.libp2p import Libp2pNetwork
    from pipeline.billing import ClientBilling
    from pipeline.client import ClientConfig, DistributedModel
    from pipeline.pricing import ModelPricing

    got: list = [None] * len(prompts)

    async def client(i: int, start: trio.Event) -> None:
        identity = Identity.generate()
        ledger = Ledger.open(identity, pricing=ModelPricing())
        async with Libp2pNetwork.open(identity, ["/ip4/127.0.0.1/tcp/0"]) as net:
            dht = DHTNode(net, bootstrap=[bootstrap], client_mode=True)
            async with trio.open_nursery() as nursery:
                await nursery.start(dht.run)
                model = await DistributedModel.from_pretrained(folder, net, dht, model_id=mid,
                                                               config=ClientConfig(billing=ClientBilling(ledger)))
                await start.wait()
                g = await model.generate(prompts[i], max_new_tokens=n, stop_token_ids=[])
                got[i] = g.token_ids
                nursery.cancel_scope.cancel()

    start = trio.Event()
    async with trio.open_nursery() as nursery:
        for i in range(len(prompts)):
            nursery.start_soon(client, i, start)
        await trio.sleep(1.0)  # every client found the servers
        start.set()
    return got


@pytest.mark.parametrize("max_batch", [8, 1])
def test_concurrent_clients_on_batching_server_processes_get_their_lone_tokens(llama_folder, tmp_path, max_batch):
    mid = model_id(llama_folder)
    local = load_local_model(llama_folder, device="cpu")
    want = [local.generate_greedy(p, NEW_TOKENS) for p in PROMPTS]
    common = ["--model", str(llama_folder), "--threads", "1", "--debt-limit", "1e9", "--max-batch", str(max_batch)]
    procs: list[PeerProcess] = []
    try:
        procs.append(PeerProcess(tmp_path / "s0", *common, "--blocks", "0:2").start(timeout=120))
        procs.append(PeerProcess(tmp_path / "s1", *common, "--blocks", "2:4", "--bootstrap", procs[0].addr)
                     .start(timeout=120))
        wait_until(lambda: all((p.status().get("server") or {}).get("throughput") for p in procs), 120,
                   message="servers to measure and announce")
        got = trio.run(_generate_at_once, llama_folder, mid, procs[0].addr, PROMPTS, NEW_TOKENS)
        assert got == want
        servers = [p.status()["server"] for p in procs]
        largest = [s["batching"]["largest"] for s in servers]
        if max_batch > 1:
            assert max(largest) > 1, servers
            assert all(s["throughput"]["batch_size"] == max_batch for s in servers)
        else:
            assert largest == [1, 1] and all("batch_decode_tps" not in s["throughput"] for s in servers)
    finally:
        for p in procs:
            p.close()
