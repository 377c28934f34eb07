"""Continuous batching: the steps of different sessions that are ready at the same time run as one forward.

    batcher = StepBatcher(limiter, max_steps=8, max_tokens=512)
    await nursery.start(batcher.run)                 # the server's nursery owns the loop
    done = await batcher.submit(BatchStep(span, cache, hidden, pos, chunks, capacity, after, priority))

- Order: waiting steps form one queue, highest priority (the client's standing) first, FIFO within
  one. A batch is the head of that queue, taken in order, up to `max_steps` steps and `max_tokens`
  new tokens (a longer step goes alone); it is never reordered to fit more. Nothing waits for a batch
  to fill: a step that arrives while a batch computes joins the next one, so a step waits behind
  lower-priority steps for at most the batch in flight, and sessions join and leave between batches.
- Compute: one worker thread call a batch, through the server's `PriorityLimiter` at the batch's
  highest priority (loading and dispute replays share that limiter). Steps over the same span with one
  chunk and one sequence (decode steps and prefill chunks alike) run as one `BlockSpan.forward_batch`:
  projections and MLP over their stacked tokens, attention per session against its own cache. A
  replay of several chunks, or a step of a span shared with no one, runs by itself in the same call.
- Memory: `max_tokens` bounds the activations of a batch; the KV caches are the sessions' own,
  reserved by the server before a step is queued (a step's cache grows to `capacity` in the thread).
- Each step stays its own: its cache growth, its checks and its `after` (the digests a signed step
  needs) run per step; a step that cannot run fails alone with its own error, and if a batched forward
  fails the steps of that forward run again one by one, so only the faulty one fails.
- Cancellation: a cancelled step still waiting leaves the queue; one already computing is waited for
  (as `trio.to_thread.run_sync` waits), so its session never sees its cache written behind its back.
  When `run` is cancelled (the server stops), the steps still queued, and those of a batch still
  waiting for the limiter, fail with InferenceError("ServerStopping").
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import trio

from .limiter import PriorityLimiter
from .model import BlockSpan, KVCache
from .protocol import InferenceError


@dataclass(eq=False)
class BatchStep:
    """One session's step as the batcher runs it; `cache`, `outputs`, `after_value` and `compute_s` are
    set when it is done (the cache may be a grown copy), or `error` when it failed."""

    span: BlockSpan
    cache: KVCache
    hidden: torch.Tensor  # [batch, n, hidden_size]
    pos: int
    chunks: list[int]
    capacity: int  # the cache is grown to this many tokens first, if smaller
    after: Callable[[torch.Tensor], Any] | None = None  # run on the outputs in the worker thread
    priority: float = math.inf
    outputs: torch.Tensor | None = None
    after_value: Any = None
    compute_s: float = 0.0
    batch_size: int = 0
    error: BaseException | None = None
    done: trio.Event = field(default_factory=trio.Event)
    taken: bool = False  # in a batch (computing or computed)
    dropped: bool = False  # cancelled while waiting: skipped when its turn comes

    @property
    def tokens(self) -> int:
        return int(self.hidden.shape[1])

    @property
    def batchable(self) -> bool:
        """One chunk of one sequence: may share a ragged forward with other sessions' steps."""
        return len(self.chunks) == 1 and self.hidden.shape[0] == 1


class StepBatcher:
    def __init__(self, limiter: PriorityLimiter, *, max_steps: int = 8, max_tokens: int = 512):
        if max_steps < 1 or max_tokens < 1:
            raise ValueError("a batch holds at least one step of one token")
        self.limiter, self.max_steps, self.max_tokens = limiter, max_steps, max_tokens
        self._queue: list[tuple[float, int, BatchStep]] = []  # (-priority, seq, step)
        self._seq = itertools.count()
        self._more = trio.Event()
        self.running = False
        self.served: list[float] = []  # priorities in the order steps were taken into batches (bounded)
        self.stats = {"batches": 0, "steps": 0, "tokens": 0, "largest": 0, "shared": 0}

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, s in self._queue if not s.dropped)

    async def submit(self, step: BatchStep) -> BatchStep:
        """Queue `step`, return it once computed; raises its own error if it failed."""
        if not self.running:
            raise InferenceError("ServerStopping", "this server is not computing")
        heapq.heappush(self._queue, (-step.priority, next(self._seq), step))
        self._more.set()
        try:
            await step.done.wait()
        except BaseException:
            if step.taken:  # computing: its cache is being written; wait for the thread like to_thread does
                with trio.CancelScope(shield=True):
                    await step.done.wait()
            else:
                step.dropped = True
            raise
        if step.error is not None:
            raise step.error
        return step

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Take batches off the queue and compute them, until cancelled; then fail what still waits."""
        self.running = True
        task_status.started()
        try:
            while True:
                batch = self._take()
                if not batch:
                    self._more = trio.Event()
                    await self._more.wait()
                    continue
                # trio annotates `limiter` as a CapacityLimiter; it takes any object with that interface
                limiter: Any = self.limiter.at(max(s.priority for s in batch))
                try:
                    await trio.to_thread.run_sync(compute_batch, batch, limiter=limiter)
                finally:
                    for s in batch:
                        if s.outputs is None and s.error is None:  # cancelled while waiting for the limiter
                            s.error = InferenceError("ServerStopping", "this server stopped computing")
                        s.done.set()
        finally:
            self.running = False
            for _, _, s in self._queue:
                s.error = InferenceError("ServerStopping", "this server stopped computing")
                s.done.set()
            self._queue.clear()

    def _take(self) -> list[BatchStep]:
        batch: list[BatchStep] = []
        tokens = 0
        while self._queue and len(batch) < self.max_steps:
            step = self._queue[0][2]
            if step.dropped:
                heapq.heappop(self._queue)
                continue
            if batch and tokens + step.tokens > self.max_tokens:
                break
            heapq.heappop(self._queue)
            step.taken = True
            batch.append(step)
            tokens += step.tokens
            self.served.append(step.priority)
        if len(self.served) > 1024:
            del self.served[:512]
        if batch:
            self.stats["batches"] += 1
            self.stats["steps"] += len(batch)
            self.stats["tokens"] += tokens
            self.stats["largest"] = max(self.stats["largest"], len(batch))
        return batch


def compute_batch(batch: list[BatchStep]) -> None:
    """In a worker thread: grow caches, run the batch (shared forwards where spans match), per-step
    `after`; every step ends with its outputs or its own error."""
    t0 = time.perf_counter()
    ready = []
    for s in batch:
        try:
            if s.capacity > s.cache.capacity:
                s.cache = s.span.grown(s.cache, s.capacity)
            ready.append(s)
        except Exception as e:  # noqa: BLE001 - handed to that step's submitter, who raises it
            s.error = e
    groups: dict[int, list[BatchStep]] = {}
    for s in ready:
        if s.batchable:
            groups.setdefault(id(s.span), []).append(s)
        else:
            _alone(s)
    for group in groups.values():
        if len(group) == 1:
            _alone(group[0])
            continue
        for s in group:
            s.batch_size = len(group)
        try:
            outs = group[0].span.forward_batch([(s.hidden, s.cache, s.pos) for s in group])
        except Exception:  # noqa: BLE001 - one bad step must not fail the others: each runs alone, keeps its own error
            for s in group:
                _alone(s)
            continue
        for s, out in zip(group, outs):
            s.outputs = out
    elapsed = time.perf_counter() - t0
    for s in batch:
        s.compute_s = elapsed
        if s.outputs is not None and s.after is not None:
            try:
                s.after_value = s.after(s.outputs)
            except Exception as e:  # noqa: BLE001 - that step's own error
                s.error = e


def _alone(s: BatchStep) -> None:
    s.batch_size = max(s.batch_size, 1)
    try:
        outs, off, p = [], 0, s.pos
        for c in s.chunks:
            outs.append(s.span.forward(s.hidden[:, off:off + c], s.cache, p))
            off, p = off + c, p + c
        s.outputs = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    except Exception as e:  # noqa: BLE001 - that step's own error
        s.error = e
        s.outputs = None
