"""The local fallback: `potluck serve --api 127.0.0.1:8000 --fallback local`.

When no route covers the model (503 no_route), or the swarm fails (503 generation_failed), this peer
runs the whole model itself and answers: marked `potluck.fallback: "local"`, nothing signed or spent
for its part. A swarm answer that failed midway is continued, not restarted: from the prompt's token ids and
those the swarm generated (potluck/generation.py `continue_locally`), so a greedy answer is the one an
undisturbed swarm gives, in the same stream.

- The blocks are loaded on the first answer that needs them (`LocalFallback.client`), and only when
  this machine can hold them and the request's KV cache (`memory.check_room`): else the 503 stays and
  says why (`NotEnoughMemory`). They are dropped after `idle_s` without a session (`run`).
- They are no BlockServer: nothing is announced and no stream handler is set, so no other peer can
  open a session with them (a user's peer never volunteers by accident). `OwnBlocks` holds them and
  runs a session's steps in process (pipeline/hop.py's `LocalServer` seam).
- Answers go through a `DistributedModel` of its own whose only route is these blocks (`NoDirectory`
  lists no other server; our own `ServerInfo` is heard directly), so sampling, stop strings,
  speculative decoding and streaming are those of a swarm answer. It shares the peer's client half
  (embeddings, LM head, tokenizer): nothing of it is loaded twice.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import torch
import trio

from pipeline.announce import ServerInfo
from pipeline.client import ClientConfig, DistributedModel
from pipeline.loading import load_span
from pipeline.model import BlockSpan, KVCache
from pipeline.protocol import InferenceError
from pipeline.server import block_bytes

from . import memory

log = logging.getLogger(__name__)

IDLE_S = 300.0  # the blocks are dropped after this long without a session


class NoDirectory:
    """A `SwarmDirectory` that knows no server: the local client's routes use our own blocks only."""

    def __init__(self, network: Any):
        self.network = network
        self.clusters: dict[int, str] = {}

    def rtt_estimate(self, peer_id: str) -> float | None:
        return None

    async def get(self, key: str, *, quorum: int = 1) -> dict:
        return {}

    async def store(self, key: str, value: Any, *, ttl: float | None = None, republish: bool = True) -> int:
        return 0


class OwnBlockSession:
    """One session with `OwnBlocks`: its own KV cache; steps are calls."""

    def __init__(self, blocks: "OwnBlocks", cache: KVCache):
        self.blocks, self.cache = blocks, cache
        self.id = secrets.token_bytes(16)
        self.closed = False

    async def run(self, hidden: torch.Tensor, pos: int, chunks: list[int] | None) -> tuple[torch.Tensor, float]:
        """The span's output for `hidden` at `pos` (a smaller `pos` rolls the cache back), and the compute seconds."""
        if self.closed:
            raise InferenceError("SessionExpired", "this local session is closed")
        t0 = time.perf_counter()
        out = await trio.to_thread.run_sync(self.blocks.span.forward, hidden, self.cache, pos,
                                            limiter=self.blocks.limiter)
        return out, time.perf_counter() - t0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.blocks.sessions -= 1
            self.blocks.last_used = trio.current_time()


class OwnBlocks:
    """Every block of a model, in this process, for this peer's own client only (`LocalServer`)."""

    def __init__(self, span: BlockSpan, model_id: str, dtype: str):
        self.span, self.model_id, self.dtype = span, model_id, dtype
        self.limiter = trio.CapacityLimiter(1)
        self.sessions = 0
        self.last_used = trio.current_time()

    async def open_local(self, model: str, start: int, end: int, max_length: int, dtype: str) -> OwnBlockSession:
        if (model, start, end, dtype) != (self.model_id, self.span.start, self.span.end, self.dtype):
            raise InferenceError("BadRequest", f"these local blocks are {self.span.start}:{self.span.end} of "
                                               f"{self.model_id[:12]} in {self.dtype}")
        cache = self.span.new_cache(max_length)
        self.sessions += 1
        return OwnBlockSession(self, cache)


def weights_bytes(client: DistributedModel) -> int:
    """Bytes every block of `client`'s model takes in its dtype (from the checkpoint's headers)."""
    return sum(block_bytes(client.folder, b, client.dtype) for b in range(client.model_config.num_layers))


def cache_bytes(client: DistributedModel, max_length: int) -> int:
    cfg = client.model_config
    return KVCache.bytes_for(cfg, cfg.num_layers, max_length, dtype=client.dtype)


class LocalFallback:
    """The peer's own copy of every block, loaded when an answer needs it (`client`), dropped when idle."""

    def __init__(self, swarm_client: Callable[[str], Awaitable[DistributedModel]], network: Any, *,
                 idle_s: float = IDLE_S, available: Callable[[], int] = memory.available_bytes):
        self.swarm_client, self.network = swarm_client, network
        self.idle_s, self.available = idle_s, available
        self.blocks: OwnBlocks | None = None
        self._client: DistributedModel | None = None
        self._lock = trio.Lock()
        self.loads = 0  # times the blocks were loaded (status, tests)

    async def client(self, model_id: str, max_length: int) -> DistributedModel:
        """The client that answers with our own blocks of `model_id` (a model this peer holds the folder of),
        for a request of `max_length` tokens; raises NotEnoughMemory when this machine cannot hold the blocks
        (if not loaded yet) and its KV cache. One model's blocks at a time: another's, idle, are dropped."""
        async with self._lock:
            swarm = await self.swarm_client(model_id)
            if self._client is not None and self._client.model_id != swarm.model_id:
                assert self.blocks is not None
                if self.blocks.sessions:  # answering with another version: its memory is not ours to take
                    raise memory.NotEnoughMemory(weights_bytes(swarm), 0)
                self.blocks = self._client = None
            need = cache_bytes(swarm, max_length) + (0 if self._client is not None else weights_bytes(swarm))
            memory.check_room(need, self.available())
            if self._client is None:
                n = swarm.model_config.num_layers
                log.info("local fallback: loading all %d blocks of %s (%d MiB)", n, swarm.model_id[:12], need >> 20)
                span = await trio.to_thread.run_sync(lambda: load_span(swarm.folder, 0, n, dtype=swarm.dtype))
                self.blocks = OwnBlocks(span, swarm.model_id, swarm.dtype_name)
                client = DistributedModel(swarm.folder, swarm.head, self.network, NoDirectory(self.network),
                                          swarm.model_id, tokenizer=swarm.tokenizer,
                                          config=ClientConfig(billing=None, spot_check=None,
                                                              speculative=swarm.client_config.speculative,
                                                              prefer=swarm.client_config.prefer),
                                          local_server=self.blocks)
                client.sequence.hear(ServerInfo(peer_id=self.network.peer_id, start=0, end=n, decode_tps=1.0,
                                                prefill_tps=1.0, cache_tokens=1 << 30, dtype=swarm.dtype_name,
                                                model_name=swarm.folder.path.name, num_blocks=n))
                self._client = client
                self.loads += 1
            assert self.blocks is not None
            self.blocks.last_used = trio.current_time()
            return self._client

    async def run(self) -> None:
        """Drop the blocks once no session used them for `idle_s`."""
        while True:
            await trio.sleep(min(self.idle_s, 30.0))
            async with self._lock:
                blocks = self.blocks
                if (blocks is not None and blocks.sessions == 0
                        and trio.current_time() - blocks.last_used >= self.idle_s):
                    log.info("local fallback: unloading the blocks, idle for %.0f s", self.idle_s)
                    self.blocks = self._client = None

    def status(self) -> dict:
        return {"loaded": self.blocks is not None, "loads": self.loads,
                "sessions": self.blocks.sessions if self.blocks is not None else 0}
