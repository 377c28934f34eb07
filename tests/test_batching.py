"""Continuous batching (pipeline/batching.py, BlockSpan.forward_batch): several sessions' steps as one
forward give each session what it gets alone; the queue keeps standing order; one bad step fails alone."""

import math

import pytest
import torch
import trio

from pipeline.batching import BatchStep, StepBatcher, compute_batch
from pipeline.limiter import PriorityLimiter
from pipeline.loading import load_span
from pipeline.model import CacheError
from pipeline.protocol import InferenceError
from testkit.models import make_tiny
from testkit.swarms import swarm

PROMPTS = [[5, 17, 42, 8, 99, 3], [7, 1, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [40, 41]]


@pytest.fixture(scope="module")
def mistral_folder(tmp_path_factory):
    """The tiny Mistral: sliding-window attention (window 5), so ragged attention meets window masks."""
    path = tmp_path_factory.mktemp("mistral")
    make_tiny("mistral", path)
    return path


# Each round: which sessions step, and how many new tokens each feeds (prefill chunks and decode steps
# share rounds; sessions join late and leave early).
SCHEDULE = [{0: 4, 1: 3}, {0: 2, 1: 1, 2: 6}, {0: 1, 2: 5, 3: 2}, {2: 1, 3: 1}, {0: 1, 2: 1, 3: 1},
            {1: 1, 3: 3}, {0: 1, 1: 1, 2: 1, 3: 1}, {0: 1, 1: 1, 2: 1, 3: 1}]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_forward_batch_equals_each_session_alone(family, llama_folder, mistral_folder):
    folder = llama_folder if family == "llama" else mistral_folder
    span = load_span(folder, 0, 4, device="cpu")
    g = torch.Generator().manual_seed(3)
    total = {i: sum(r.get(i, 0) for r in SCHEDULE) for i in range(4)}
    inputs = {i: torch.randn(1, total[i], span.cfg.hidden_size, generator=g) for i in range(4)}
    alone = {i: span.new_cache(total[i]) for i in range(4)}
    batched = {i: span.new_cache(total[i]) for i in range(4)}
    fed = dict.fromkeys(range(4), 0)
    shared_rounds = 0
    for r in SCHEDULE:
        steps, want = [], []
        for i, n in r.items():
            x = inputs[i][:, fed[i]:fed[i] + n]
            want.append(span.forward(x, alone[i]))
            steps.append((x, batched[i], fed[i]))
            fed[i] += n
        got = span.forward_batch(steps)
        shared_rounds += len(steps) > 1
        for (_, cache, _), w, o in zip(steps, want, got):
            assert o.shape == w.shape
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
            assert cache.length == fed[next(i for i in r if batched[i] is cache)]
    assert shared_rounds == len(SCHEDULE)
    # the caches hold the same keys and values as the lone runs'
    for i in range(4):
        for a, b in zip(alone[i].k + alone[i].v, batched[i].k + batched[i].v):
            torch.testing.assert_close(a[:, :, :fed[i]], b[:, :, :fed[i]], rtol=1e-5, atol=1e-5)


def test_forward_batch_rerun_at_an_earlier_position_and_bad_step_untouched(llama_folder):
    span = load_span(llama_folder, 0, 4, device="cpu")
    x = torch.randn(2, 1, 6, span.cfg.hidden_size)
    a, b = span.new_cache(8), span.new_cache(8)
    span.forward_batch([(x[0], a, 0), (x[1], b, 0)])
    # a rollback: session a re-runs its last 2 tokens, b goes on
    ref = span.new_cache(8)
    span.forward(x[0][:, :4], ref)
    want = span.forward(x[0][:, 4:], ref)
    got = span.forward_batch([(x[0][:, 4:], a, 4), (x[1][:, :1], b, None)])
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)
    assert a.length == 6 and b.length == 7
    with pytest.raises(CacheError):  # position past what b holds: nothing runs, nothing is trimmed
        span.forward_batch([(x[0][:, :1], a, 2), (x[1][:, :1], b, 9)])
    assert a.length == 6 and b.length == 7


def test_greedy_tokens_identical_when_generated_in_one_batch(llama):
    path, _, local = llama
    span = load_span(path, 0, local.cfg.num_layers, device="cpu")
    want = [local.generate_greedy(p, 8) for p in PROMPTS]
    caches = [span.new_cache(32) for _ in PROMPTS]
    nxt = [torch.tensor([p]) for p in PROMPTS]
    got: list[list[int]] = [[] for _ in PROMPTS]
    for _ in range(8):
        outs = span.forward_batch([(local.head.embed(t), c, None) for t, c in zip(nxt, caches)])
        for i, o in enumerate(outs):
            tok = int(local.head.logits(o)[0, -1].argmax())
            got[i].append(tok)
            nxt[i] = torch.tensor([[tok]])
    assert got == want


def _step(span, cache, n, priority, **kw):
    return BatchStep(span, cache, torch.randn(1, n, span.cfg.hidden_size), cache.length, [n], cache.capacity,
                     priority=priority, **kw)


async def test_batches_fill_in_standing_order_and_a_debtor_delays_standing_at_most_one_batch(llama_folder):
    span = load_span(llama_folder, 0, 2, device="cpu")
    limiter = PriorityLimiter(1)
    batcher = StepBatcher(limiter, max_steps=2, max_tokens=64)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await limiter.acquire_on_behalf_of("busy")  # the compute thread is taken: steps queue up
        first = _step(span, span.new_cache(8), 2, 0)  # a debtor's, taken into the batch in flight
        nursery.start_soon(batcher.submit, first)
        while not first.taken:
            await trio.sleep(0.01)
        for prio in (0, 5, -1, 9, 0):
            nursery.start_soon(batcher.submit, _step(span, span.new_cache(8), 2, prio))
            await trio.sleep(0.01)
        assert batcher.waiting == 5
        limiter.release_on_behalf_of("busy")
        while batcher.stats["steps"] < 6:
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    served = batcher.served
    # the debtor's step was in the batch in flight (the only delay standing suffers); then standing order
    assert served == [0, 9, 5, 0, 0, -1]
    assert batcher.stats["batches"] == 4 and batcher.stats["largest"] == 2


async def test_one_bad_step_fails_alone_in_its_batch(llama_folder):
    span = load_span(llama_folder, 0, 2, device="cpu")
    good, bad = span.new_cache(8), span.new_cache(8)
    steps = [_step(span, good, 3, 1.0), _step(span, bad, 3, 1.0)]
    steps[1].pos = 5  # past what its cache holds
    compute_batch(steps)
    assert steps[0].error is None and steps[0].outputs is not None and good.length == 3
    assert isinstance(steps[1].error, CacheError) and steps[1].outputs is None and bad.length == 0
    # an `after` that raises fails its own step only
    c1, c2 = span.new_cache(8), span.new_cache(8)

    def boom(_):
        raise ValueError("digest failed")

    steps = [_step(span, c1, 2, 1.0, after=lambda o: o.shape[1]), _step(span, c2, 2, 1.0, after=boom)]
    compute_batch(steps)
    assert steps[0].after_value == 2 and steps[0].error is None and isinstance(steps[1].error, ValueError)


async def test_a_cancelled_waiting_step_leaves_the_queue(llama_folder):
    span = load_span(llama_folder, 0, 2, device="cpu")
    limiter = PriorityLimiter(1)
    batcher = StepBatcher(limiter, max_steps=4, max_tokens=64)
    async with trio.open_nursery() as nursery:
        await nursery.start(batcher.run)
        await limiter.acquire_on_behalf_of("busy")
        first = _step(span, span.new_cache(8), 1, 0.0)
        nursery.start_soon(batcher.submit, first)
        while not first.taken:
            await trio.sleep(0.01)
        gone = _step(span, span.new_cache(8), 1, math.inf)
        with trio.move_on_after(0.05):
            await batcher.submit(gone)
        assert gone.dropped and batcher.waiting == 0
        limiter.release_on_behalf_of("busy")
        await first.done.wait()
        nursery.cancel_scope.cancel()
    assert first.outputs is not None and gone.outputs is None and batcher.stats["steps"] == 1


async def test_steps_of_a_batch_cancelled_before_its_thread_fail_typed(llama_folder):
    """The server stops while a batch waits for the limiter: its steps fail as ServerStopping, none is left
    done with neither outputs nor an error."""
    span = load_span(llama_folder, 0, 2, device="cpu")
    limiter = PriorityLimiter(1)
    batcher = StepBatcher(limiter, max_steps=4, max_tokens=64)
    step = _step(span, span.new_cache(8), 1, 0.0)
    failed = []

    async def submit():
        try:
            await batcher.submit(step)
        except InferenceError as e:
            failed.append(e.kind)

    async with trio.open_nursery() as clients:
        async with trio.open_nursery() as server:
            await server.start(batcher.run)
            await limiter.acquire_on_behalf_of("busy")  # the compute thread is taken: the batch waits
            clients.start_soon(submit)
            while not step.taken:
                await trio.sleep(0.01)
            server.cancel_scope.cancel()
    assert failed == ["ServerStopping"] and step.outputs is None


async def test_concurrent_clients_through_a_batching_swarm_get_their_lone_tokens(llama):
    """4 clients at once through 2 in-process servers: the servers batch their steps (seen in their
    stats) and every client's greedy tokens equal a local run's."""
    path, mid, local = llama
    want = [local.generate_greedy(p, 10) for p in PROMPTS]
    with trio.fail_after(60):
        async with swarm("sim", path, [(0, 2), (2, 4)], model_id=mid) as s:
            models = [await s.client() for _ in PROMPTS]
            got: list = [None] * len(PROMPTS)

            async def gen(i):
                g = await models[i].generate(PROMPTS[i], max_new_tokens=10, stop_token_ids=[])
                got[i] = g.token_ids

            async with trio.open_nursery() as nursery:
                for i in range(len(PROMPTS)):
                    nursery.start_soon(gen, i)
            assert got == want
            assert max(p.server.batcher.stats["largest"] for p in s.servers) > 1


def test_announcements_carry_batched_capacity_and_old_ones_still_decode():
    from pipeline.announce import InvalidRecord, ServerInfo
    from pipeline.routing import choose_span, coverage

    new = ServerInfo("p1", 0, 2, decode_tps=100.0, prefill_tps=900.0, cache_tokens=10,
                     batch_decode_tps=450.0, batch_size=8)
    back = ServerInfo.from_value("p1", new.to_value(), num_blocks=4)
    assert (back.batch_decode_tps, back.batch_size, back.capacity_tps) == (450.0, 8, 450.0)
    old = new.to_value()
    del old["batch_decode_tps"], old["batch_size"]  # a server from before batching
    was = ServerInfo.from_value("p2", old, num_blocks=4)
    assert (was.batch_decode_tps, was.batch_size, was.capacity_tps) == (None, 1, 100.0)
    for bad in ({"batch_decode_tps": -1.0}, {"batch_decode_tps": "fast"}, {"batch_size": 0}, {"batch_size": 1.5},
                {"batch_size": 10**9}):
        with pytest.raises(InvalidRecord):
            ServerInfo.from_value("p3", {**new.to_value(), **bad}, num_blocks=4)
    # --blocks auto sees capacity: a batching server's blocks are the better covered ones
    plain = ServerInfo("p4", 2, 4, decode_tps=120.0, prefill_tps=900.0, cache_tokens=10)
    assert coverage([new, plain], 4) == [450.0, 450.0, 120.0, 120.0]
    assert choose_span([new, plain], 4, 2) == (2, 4)


def test_batch_throughput_probe(llama_folder):
    from pipeline.measure import batch_throughput
    from pipeline.server import measure_throughput

    span = load_span(llama_folder, 0, 4, device="cpu")
    tps = batch_throughput(span, (1, 4), context=4, steps=2, repeats=1)
    assert set(tps) == {1, 4} and all(v > 0 for v in tps.values())
    tp = measure_throughput(span, decode_steps=4, prefill_tokens=8, batch=4)
    assert tp["batch_size"] == 4 and tp["batch_decode_tps"] >= tp["decode_tps"] > 0
    assert "batch_decode_tps" not in measure_throughput(span, decode_steps=4, prefill_tokens=8)
