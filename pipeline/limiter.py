"""`PriorityLimiter`: a capacity limiter for trio's worker threads whose waiters are served highest
priority first, FIFO within a priority (the server queues compute by client standing with it)."""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import trio


class PriorityLimiter:
    """A capacity limiter whose waiters are served highest priority first, FIFO within a priority.

    Usable wherever trio wants a limiter (`trio.to_thread.run_sync(fn, limiter=...)`): the plain
    `acquire_on_behalf_of` takes priority +inf (loading, cache allocation); `at(priority)` gives a
    limiter view that queues at `priority` (a client's standing, in FLOPs)."""

    def __init__(self, total_tokens: int = 1):
        if total_tokens < 1:
            raise ValueError("a limiter needs at least one token")
        self.total_tokens = total_tokens
        self._holders: set[Any] = set()
        self._waiters: list[list[Any]] = []  # [-priority, seq, borrower (None: cancelled), event]
        self._granted: set[Any] = set()
        self._seq = itertools.count()
        self.served: list[float] = []  # priorities in the order they were granted (tests, stats; bounded)

    @property
    def borrowed_tokens(self) -> int:
        return len(self._holders)

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, b, _ in self._waiters if b is not None)

    def at(self, priority: float) -> "_PriorityView":
        return _PriorityView(self, priority)

    async def acquire_on_behalf_of(self, borrower: Any, priority: float = math.inf) -> None:
        if borrower in self._holders:
            raise RuntimeError("this borrower already holds a token")
        if len(self._holders) < self.total_tokens and not self.waiting:
            self._grant(borrower, priority)
            await trio.lowlevel.checkpoint()
            return
        event = trio.Event()
        item = [-priority, next(self._seq), borrower, event]
        heapq.heappush(self._waiters, item)
        try:
            await event.wait()
        except BaseException:
            if borrower in self._holders:  # granted while being cancelled: hand it on
                self.release_on_behalf_of(borrower)
            else:
                item[2] = None  # lazily dropped from the heap
            raise

    def _grant(self, borrower: Any, priority: float) -> None:
        self._holders.add(borrower)
        self.served.append(priority)
        if len(self.served) > 1024:
            del self.served[:512]

    def release_on_behalf_of(self, borrower: Any) -> None:
        if borrower not in self._holders:
            raise RuntimeError("this borrower holds no token")
        self._holders.discard(borrower)
        while self._waiters and len(self._holders) < self.total_tokens:
            neg, _, b, event = heapq.heappop(self._waiters)
            if b is None:
                continue
            self._grant(b, -neg)
            event.set()

    async def acquire(self) -> None:
        await self.acquire_on_behalf_of(trio.lowlevel.current_task())

    def release(self) -> None:
        self.release_on_behalf_of(trio.lowlevel.current_task())

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _PriorityView:
    def __init__(self, limiter: PriorityLimiter, priority: float):
        self.limiter, self.priority = limiter, priority

    async def acquire_on_behalf_of(self, borrower: Any) -> None:
        await self.limiter.acquire_on_behalf_of(borrower, self.priority)

    def release_on_behalf_of(self, borrower: Any) -> None:
        self.limiter.release_on_behalf_of(borrower)
