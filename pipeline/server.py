"""BlockServer: serve blocks [start, end) of a model to inference sessions, announce them in the DHT.

    server = BlockServer(network, dht, model_folder, 0, 10)           # or start=None: --blocks auto
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)   # loads, measures, serves, announces; started → ready
        ...
        nursery.cancel_scope.cancel()     # clean shutdown: sessions closed, "offline" announced

- Sessions (pipeline/protocol.py): one stream per session; the server keeps the session's KV cache,
  counted against `cache_budget_bytes`. A session may ask for any sub-span of ours. Every bad
  message gets an error reply and the session (and every other session) goes on.
- "open" is refused with CacheFull unless its max length fits the free budget and the client's share.
  A client without standing books its whole max length at open (so a full strangers' pool refuses it
  there, never mid-generation); one with standing books only `initial_cache_tokens` and what it uses
  after that: its cache grows (doubling, copied) as steps need it, each growth checked again (it may
  be refused then). Either way the cache's memory is allocated as it grows (without standing from
  `stranger_open_cache_tokens`: a booking is accounting, idle sessions hold little memory). A client
  holds at most `cache_share` of the budget over all its sessions (and at most `stranger_cache_tokens` of the span;
  all clients without standing together at most `strangers_cache_tokens` and `strangers_cache_share`
  of the budget: `StrangerCaps`), or `cache_share_standing` with standing in this server's view
  (billing, credits.standing), and opens at most `cache_share` of `max_sessions`. A session that does
  not fit displaces the longest-idle sessions of other clients without standing (never one computing):
  a client with standing those idle at least `displace_idle_after`, a newcomer without standing only
  those that never stepped (idle as long) or idle at least `stranger_displace_idle_after` (longer than
  a generation's gap between steps on a slow route: strangers do not end each other's generations).
  The displaced client sees Displaced (no fault: it re-routes); any other end says SessionExpired.
  Sessions expire when idle: `first_step_timeout` before their first step, `session_timeout` after,
  and at most `stranger_idle_timeout` without standing.
- All torch work (loading, measuring, every step) runs in worker threads through one
  `PriorityLimiter`, so the peer's trio loop (DHT, membership, other sessions' I/O) never
  waits on a matmul. Steps go through a `StepBatcher` (pipeline/batching.py, continuous batching):
  the steps of different sessions waiting at the same time run as one forward, at most
  `max_batch_steps` steps and `max_batch_tokens` new tokens a batch, one batch at a time.
- At start the server measures its throughput (prefill and decode tokens/s through one block,
  after a warm-up; and decode tokens/s of `max_batch_steps` sessions batched) and announces span, throughput, free cache tokens, sessions held (its load), dtype, version, addresses,
  clusters and its grid signal if it has a `grid_signal_file` (pipeline/announce.py, pipeline/grid.py), again every `announce_period`, and "offline" on shutdown.
- Auto placement (start=None): as many blocks as fit `memory_budget_bytes`, placed on the window
  whose blocks have the fewest replicas (up to 2), then the least throughput (pipeline/routing.py
  `choose_span`); every `rebalance_period` it moves when a block has fewer than 2 replicas or swarm
  quality (min/max per-block throughput) is below `rebalance_threshold`, and moving leaves the swarm
  better by that same order (`rebalance_span`).
- A client in the same process (the peer's own, pipeline/hop.py `LocalHop`) opens sessions with
  `open_local`: the same admission and refusals, the same KV caches and limits, but steps are calls
  (`InProcessSession.run`) — no stream, no serialisation, nothing billed (serving ourselves is free).
- Server-to-server forwarding: a step may carry a "push" list; the output is then also sent to the
  next server's session (stream `/potluck/inference-push/1.0.0`), which answers the client itself.
  The next hop must be a server whose current announcement (as this server reads the DHT, at most
  every `announcement_refresh` seconds) covers the block after the session's span; when not connected,
  it is dialled at the addresses it announced (pipeline/hop.py `connect_announced`), then by peer id. A
  step naming anyone else is refused before computing (PushRefused); addresses a client sends are never used.
- Signed results (pipeline/proofs.py): when "open" carries the client's fingerprint seed, every "out"
  carries the server's signature over the step's result — the input digest chaining the session's
  history (`InputChain`, updated with the KV cache under the session's compute lock), the output
  digest and the seeded fingerprint — so a lie it returns is a lie it signed, checkable by anyone
  holding the span (pipeline/disputes.py).
- Credits (`billing=ServerBilling(ledger)`, pipeline/billing.py): "open" is admitted by what the client
  owes against its allowance here (credits.admission: refused past it unless this server is idle); each step's "receipt" is checked
  BEFORE the step is computed and must cover every token served before it and the step's own
  ("ReceiptRequired: the client stopped signing receipts"); unless no other client has a session
  here, a step that would take the client's unsettled receipts past its debt allowance is refused
  (CreditRefused); every "out" says how many tokens the session has been served ("served"); "close" carries
  the final receipt; the latest receipt becomes an earn entry when the session ends (close, expiry,
  disconnect, shutdown) and periodically in long sessions. Steps wait in the batcher's queue:
  highest client standing (this server's own view) first, FIFO within a standing; batches are filled
  in that order, so a step waits behind lower standing for at most the batch in flight. Idle (for admission) = no other session open.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import torch
import trio

from p2p.errors import FrameError, P2PError
from p2p.framing import expect_map, field as mfield
from p2p.gossip import Gossip
from p2p.network import Network, Stream

from . import protocol as proto
from .announce import (GOSSIP_TOPIC, MAX_ANNOUNCED_SESSIONS, VERSION, ModelCard, ServerInfo, announce_key,
                       announce_model, announced_addrs, fetch_servers, gossip_note)
from .batching import BatchStep, StepBatcher
from .billing import ServerAccount, ServerBilling
from .directory import SwarmDirectory
from .limiter import PriorityLimiter
from .loading import ModelFolder, load_span, resolve_dtype
from .measure import batch_throughput
from .flops import TIER_PREFILL_TOKENS, tier_flops_per_token
from .hop import connect_announced
from .grid import GridSignal, GridSignalFile
from .model import BlockSpan, CacheError, KVCache
from .proofs import SEED_LEN, InputChain, result_digests, sign_step, tensor_digest
from .protocol import InferenceError, error, int_field, pack_hidden, unpack_hidden
from .routing import choose_span, rebalance_span
from .tiers import DEFAULT_QUARANTINE_S, TierRecord, settle_tier

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerConfig:
    dtype: str = "float32"
    device: str | None = "cpu"
    cache_budget_bytes: int = 256 * 1024 * 1024
    max_sessions: int = 128
    max_length: int = 8192  # longest session we accept (also capped by the model's context)
    session_timeout: float = 300.0  # idle seconds before a session is dropped
    announce_period: float = 30.0
    announce_ttl: float | None = None  # default 2 × announce_period
    throughput: dict | None = None  # {"decode_tps": f, "prefill_tps": f} to skip measuring
    measure_decode_steps: int = 16
    measure_prefill_tokens: int = TIER_PREFILL_TOKENS  # clients price a measured tokens/s at this many (pipeline/flops.py)
    memory_budget_bytes: int | None = None  # for auto placement; default half of available memory
    num_blocks: int | None = None  # for auto placement: force this many blocks
    rebalance_period: float = 60.0
    rebalance_threshold: float = 0.75
    compute_threads: int = 1
    max_batch_steps: int = 8  # steps of different sessions computed as one forward (1: no batching)
    max_batch_tokens: int = 512  # new tokens in one batch (a longer step runs alone)
    push_timeout: float = 10.0
    first_step_timeout: float = 20.0  # idle seconds before a session's first step (capped by session_timeout)
    initial_cache_tokens: int = 256  # what "open" reserves; the cache grows with the steps
    # what "open" allocates without standing: such a session books its whole max length (the pool's
    # accounting) but its memory follows its steps, which are paid for before they run, so idle
    # sessions of fresh keys reserve room in the pool, not the server's RAM
    stranger_open_cache_tokens: int = 16
    cache_share: float = 0.5  # of the budget (and of max_sessions), the most one client without standing holds
    # A key costs nothing to make: clients without standing are also held to tokens of the span served
    # (`StrangerCaps`, converted with its KV bytes a token: a long session of a big model as of a small one)
    stranger_cache_tokens: int = 4096  # one client without standing: a long prompt and its answer
    strangers_cache_tokens: int = 16384  # all of them together (Sybil keys too): a few such sessions ...
    strangers_cache_share: float = 0.5  # ... and at most this fraction of the budget: standing keeps the rest
    stranger_idle_timeout: float = 10.0  # idle seconds before a session without standing is dropped
    cache_share_standing: float = 1.0  # ... and one with standing in this server's view
    # a session without standing idle this long may be displaced: by a client with standing that needs
    # the room, or by one without that the strangers' pool (or the budget) would refuse if it never stepped
    displace_idle_after: float = 1.0
    # ... and one that stepped, by a newcomer without standing, only once idle this long: a generation on
    # a slow (WAN, CPU) route is idle here a second or more between its steps
    stranger_displace_idle_after: float = 5.0
    supersedes: str | None = None  # the model id the served model is a new version of (announced)
    announcement_refresh: float = 1.0  # least seconds between reads of the swarm's announcements (push checks)
    grid_signal_file: str | None = None  # re-read at each announcement, announced while fresh (pipeline/grid.py)
    state_dir: str | None = None  # keeps the hardware tier across restarts, for its quarantine (pipeline/tiers.py)
    tier_quarantine_s: float = DEFAULT_QUARANTINE_S  # after a change of tier: priced at the lower one this long


@dataclass(frozen=True)
class StrangerCaps:
    """The KV cache bytes clients without standing may hold: one of them (`per_client`), all of them
    together (`pool`) — the configured tokens at `token_bytes` a token, within the budget's fractions."""

    per_client: int
    pool: int

    @classmethod
    def of(cls, config: ServerConfig, token_bytes: int) -> StrangerCaps:
        budget = config.cache_budget_bytes
        return cls(per_client=min(config.stranger_cache_tokens * token_bytes, int(budget * config.cache_share)),
                   pool=min(config.strangers_cache_tokens * token_bytes, int(budget * config.strangers_cache_share)))


@dataclass
class ServedSession:
    """The server's state for one open inference session (one client stream)."""

    id: bytes
    peer_id: str
    span: BlockSpan  # the (sub-)span this session runs
    cache: KVCache
    max_length: int
    dtype: str
    stream: Stream | None  # None: a session of this peer's own client (`open_local`)
    scope: trio.CancelScope
    nbytes: int
    last_used: float
    last_step: int = -1
    last_pos: int = 0  # where the last step started, and its tokens (what a rollback may credit back)
    last_tokens: int = 0
    steps: int = 0
    tokens: int = 0  # what the session is billed: tokens computed, less rolled-back drafts (refunded_tokens)
    standing: bool = False  # may displace idle sessions of clients without (see BlockServer._reserve)
    end_kind: str = proto.SESSION_EXPIRED  # the error its client is told when the server ends it
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    compute_lock: trio.Lock = field(default_factory=trio.Lock)
    account: ServerAccount | None = None  # credits (billing)
    seed: bytes | None = None  # the client's fingerprint seed: steps are signed (pipeline/proofs.py)
    inputs: InputChain | None = None  # the input digest of the session's history (signed steps)


def measure_throughput(span: BlockSpan, *, decode_steps: int = 16, prefill_tokens: int = 64, batch: int = 1) -> dict:
    """Tokens/s through ONE block of `span`, for prefill and for decode (after a short warm-up); with
    `batch` > 1 also the aggregate decode tokens/s when that many sessions step together (continuous
    batching: what this server can serve, where decode_tps is what one stream gets)."""
    cfg = span.cfg
    cache = span.new_cache(prefill_tokens + decode_steps + 8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, prefill_tokens, cfg.hidden_size, generator=g).to(span.dtype)
    span.forward(x[:, :4], cache)  # warm-up: first calls allocate and pick kernels
    span.forward(x[:, :1], cache)
    cache.trim(0)
    t0 = time.perf_counter()
    span.forward(x, cache)
    prefill_s = max(time.perf_counter() - t0, 1e-9)
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        span.forward(x[:, :1], cache)
    decode_s = max(time.perf_counter() - t0, 1e-9) / decode_steps
    n = len(span)
    tp = {"decode_tps": n / decode_s, "prefill_tps": n * prefill_tokens / prefill_s}
    if batch > 1:
        tps = batch_throughput(span, (batch,), context=16, steps=max(2, decode_steps // 4), repeats=1)
        tp.update(batch_decode_tps=max(tps[batch], tp["decode_tps"]), batch_size=batch)
    return tp


def block_bytes(mf: ModelFolder, block: int, dtype: torch.dtype) -> int:
    """Bytes block `block`'s weights take in `dtype` (from the safetensors headers, nothing read)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for name in mf.block_tensor_names(block):
        _, info, _ = mf.tensor_info(name)
        total += math.prod(info["shape"]) * size
    return total


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def parse_blocks(spec: str, num_blocks: int | None = None) -> tuple[int | None, int | None]:
    """'a:b' → (a, b); 'auto' → (None, None)."""
    if spec == "auto":
        return None, None
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--blocks must be a:b or auto, got {spec!r}") from None
    if not (0 <= a < b) or (num_blocks is not None and b > num_blocks):
        raise ValueError(f"--blocks {spec}: need 0 <= a < b <= {num_blocks or 'number of blocks'}")
    return a, b


class BlockServer:
    def __init__(self, network: Network, dht: SwarmDirectory, model_folder: str | os.PathLike | ModelFolder,
                 start: int | None = None, end: int | None = None, *, config: ServerConfig | None = None,
                 model_id: str | None = None, gossip: Gossip | None = None,
                 billing: ServerBilling | None = None):
        if (start is None) != (end is None):
            raise ValueError("give both start and end, or neither (auto placement)")
        self.network = network
        self.dht = dht
        self.model_folder = model_folder
        self.start, self.end = start, end
        self.auto = start is None
        self.config = config or ServerConfig()
        self.model_id = model_id
        self.gossip = gossip  # announcements also go out as gossip, for fast updates
        self.billing = billing
        self.reliability = 1.0  # announced; refreshed from the ledger before each announcement
        self.started = 0.0  # network time this server started serving (announced: clients lift fault bans)
        self.grid_source = (GridSignalFile(self.config.grid_signal_file, max_age=3 * self.config.announce_period)
                            if self.config.grid_signal_file is not None else None)
        self.grid: GridSignal | None = None  # announced; re-read from the file before each announcement
        self.dtype = resolve_dtype(self.config.dtype)
        self.dtype_name = proto.dtype_name(self.dtype)
        self.limiter = PriorityLimiter(self.config.compute_threads)  # loading, batches, dispute replays
        self.batcher = StepBatcher(self.limiter, max_steps=self.config.max_batch_steps,
                                   max_tokens=self.config.max_batch_tokens)  # steps queue by client standing
        self.span: BlockSpan | None = None
        self.mf: ModelFolder | None = None
        self.throughput: dict = {}
        self.flops_per_s = 0.0  # effective FLOP/s of the start-up measurement: what places us in a tier
        self.tier: TierRecord | None = None
        self.sessions: dict[bytes, ServedSession] = {}
        self.cache_used = 0
        self.stranger_caps = StrangerCaps(0, 0)  # set for the span loaded
        self.ready = trio.Event()
        self.stopping = False
        self._subspans: dict[tuple[int, int], BlockSpan] = {}
        self._push_streams: dict[str, Stream] = {}
        self._push_locks: dict[str, trio.Lock] = {}
        self._announced: dict[str, ServerInfo] = {}  # peer id → its announcement, as last read
        self._announced_at = -math.inf
        self._announced_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.stats = {"sessions_opened": 0, "sessions_refused": 0, "steps": 0, "tokens": 0, "errors": 0,
                      "pushes_sent": 0, "pushes_received": 0, "push_failures": 0, "pushes_refused": 0, "expired": 0,
                      "displaced": 0, "moves": 0}

    # --- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Load, measure, serve and announce until cancelled; `started` once it accepts sessions."""
        mf = self.mf = await self._in_thread(self._open_folder)
        cfg = mf.config
        if self.model_id is None:
            from .identity import model_id as compute_id

            self.model_id = await self._in_thread(compute_id, mf)
        if self.billing is not None:
            self.billing.register_model(self.model_id, cfg)
        if self.auto:
            self.start, self.end = await self._choose_span()
        assert self.start is not None and self.end is not None  # given, or chosen just above
        if not (0 <= self.start < self.end <= cfg.num_layers):
            raise ValueError(f"span {self.start}:{self.end} is outside the model's {cfg.num_layers} blocks")
        await self._load(self.start, self.end)
        self.network.set_stream_handler(proto.INFERENCE, self._handle_session)
        self.network.set_stream_handler(proto.PUSH, self._handle_push)
        self.started = self.network.now()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self.batcher.run)
                try:
                    await self.announce()
                except P2PError as e:  # the announce loop tries again shortly
                    log.info("first announcement failed: %s", e)
                self.ready.set()
                task_status.started(self)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._expire_loop)
                if self.auto:
                    nursery.start_soon(self._rebalance_loop)
        finally:
            self.stopping = True
            self._nursery = None
            self.network.set_stream_handler(proto.INFERENCE, _refuse_stopped)
            self.network.set_stream_handler(proto.PUSH, _refuse_stopped)
            for s in list(self.sessions.values()):
                s.scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(3.0):
                for st in list(self._push_streams.values()):
                    with trio.move_on_after(0.5):
                        try:
                            await st.aclose()
                        except P2PError:
                            pass
                try:
                    await self.announce(state="offline")
                except Exception as e:  # noqa: BLE001 - best effort while shutting down
                    log.info("offline announcement failed: %s", e)

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread, queued by the compute limiter."""
        # trio annotates `limiter` as a CapacityLimiter; it takes any object with that interface
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)  # type: ignore[arg-type]

    def _open_folder(self) -> ModelFolder:
        return self.model_folder if isinstance(self.model_folder, ModelFolder) else ModelFolder(self.model_folder)

    async def _load(self, start: int, end: int) -> None:
        cfg = self.config
        mf, model_id = self.mf, self.model_id
        assert mf is not None and model_id is not None  # run() opened the folder first
        span = await self._in_thread(lambda: load_span(mf, start, end, dtype=self.dtype, device=cfg.device))
        if cfg.throughput is not None:
            tp = {"decode_tps": float(cfg.throughput["decode_tps"]), "prefill_tps": float(cfg.throughput["prefill_tps"])}
            if "batch_decode_tps" in cfg.throughput:
                tp.update(batch_decode_tps=float(cfg.throughput["batch_decode_tps"]),
                          batch_size=int(cfg.throughput["batch_size"]))
        else:
            tp = await self._in_thread(lambda: measure_throughput(span, decode_steps=cfg.measure_decode_steps,
                                                                  prefill_tokens=cfg.measure_prefill_tokens,
                                                                  batch=cfg.max_batch_steps))
        self.span, self.start, self.end, self.throughput = span, start, end, tp
        self.stranger_caps = StrangerCaps.of(cfg, span.cache_bytes(1))
        self._subspans = {(start, end): span}
        self.flops_per_s = tp["prefill_tps"] * tier_flops_per_token(mf.config, start, cfg.measure_prefill_tokens)
        self.tier = await trio.to_thread.run_sync(settle_tier, cfg.state_dir, self.flops_per_s, time.time(),
                                                  cfg.tier_quarantine_s)
        self._price_tier()
        log.info("serving blocks [%d, %d) of %s: %.0f decode / %.0f prefill tokens/s per block",
                 start, end, model_id[:12], tp["decode_tps"], tp["prefill_tps"])

    # --- placement -------------------------------------------------------------------------------

    def blocks_that_fit(self) -> int:
        assert self.mf is not None  # run() opened the folder first
        cfg = self.config
        n = self.mf.config.num_layers
        if cfg.num_blocks is not None:
            return max(1, min(cfg.num_blocks, n))
        budget = (cfg.memory_budget_bytes if cfg.memory_budget_bytes is not None else available_memory() // 2)
        budget -= cfg.cache_budget_bytes
        per_block = max(1, block_bytes(self.mf, 0, self.dtype))
        return max(1, min(n, budget // per_block))

    async def _swarm(self) -> list[ServerInfo]:
        assert self.mf is not None and self.model_id is not None  # run() opened the folder first
        try:
            servers = await fetch_servers(self.dht, self.model_id, num_blocks=self.mf.config.num_layers)
        except P2PError as e:
            log.info("could not read the swarm's announcements: %s", e)
            return []
        return [s for s in servers if s.peer_id != self.network.peer_id]

    async def _choose_span(self) -> tuple[int, int]:
        k = self.blocks_that_fit()
        assert self.mf is not None  # run() opened the folder first
        return choose_span(await self._swarm(), self.mf.config.num_layers, k)

    async def rebalance_once(self) -> bool:
        """Move to a better window if the swarm lacks replicas or balance and moving helps; True if moved."""
        assert self.mf is not None and self.start is not None and self.end is not None  # run() set it up before serving
        target = rebalance_span(await self._swarm(), self.info(), self.mf.config.num_layers,
                                self.config.rebalance_threshold)
        if target is None:
            return False
        a, b = target
        log.info("rebalancing: moving from [%d, %d) to [%d, %d)", self.start, self.end, a, b)
        for s in list(self.sessions.values()):
            s.scope.cancel()
        await self._load(a, b)
        self.stats["moves"] += 1
        await self.announce()
        return True

    async def _rebalance_loop(self) -> None:
        while True:
            await trio.sleep(self.config.rebalance_period)
            try:
                await self.rebalance_once()
            except (P2PError, OSError) as e:
                log.info("rebalance failed: %s", e)

    # --- announcements ---------------------------------------------------------------------------

    def cache_tokens_left(self) -> int:
        assert self.mf is not None and self.start is not None and self.end is not None  # run() set it up before serving
        per_token = KVCache.bytes_for(self.mf.config, self.end - self.start, 1, dtype=self.dtype)
        return max(0, (self.config.cache_budget_bytes - self.cache_used) // per_token)

    def _price_tier(self) -> None:
        """The rate sessions opened from now on are priced at, from the tier we announce now (a quarantine may end)."""
        if self.billing is not None and self.tier is not None:
            self.billing.set_tier(self.tier.announced_milli(time.time()), self.dtype_name)

    def info(self, state: str = "online") -> ServerInfo:
        assert self.mf is not None and self.model_id is not None  # run() set it up before serving
        assert self.start is not None and self.end is not None
        card = ModelCard.announced(self.model_id, self.mf.path.name, self.mf.config)
        clusters = self.dht.clusters
        return ServerInfo(peer_id=self.network.peer_id, start=self.start, end=self.end,
                          decode_tps=self.throughput.get("decode_tps", 1.0),
                          prefill_tps=self.throughput.get("prefill_tps", 1.0),
                          batch_decode_tps=self.throughput.get("batch_decode_tps"),
                          batch_size=self.throughput.get("batch_size", 1),
                          sessions=min(len(self.sessions), MAX_ANNOUNCED_SESSIONS),
                          cache_tokens=self.cache_tokens_left(), state=state, dtype=self.dtype_name,
                          version=VERSION, addrs=announced_addrs(self.network.peer_id, self.network.announce_addrs()),
                          clusters={str(k): v for k, v in clusters.items() if v}, t=self.network.now(),
                          reliability=self.reliability, started=self.started,
                          model_name=card.name, num_blocks=card.num_blocks, context_length=card.context_length,
                          grid=self.grid, supersedes=self.config.supersedes,
                          tier=self.tier.tier if self.tier is not None else None,
                          tier_milli=self.tier.announced_milli(time.time()) if self.tier is not None else None,
                          flops_per_s=self.flops_per_s or None)

    async def announce(self, state: str = "online") -> int:
        """Store our announcement; returns how many peers (ourselves included) hold it."""
        ttl = self.config.announce_ttl or 2 * self.config.announce_period
        if self.billing is not None:
            try:
                self.reliability = await self.billing.reliability()
            except Exception as e:  # noqa: BLE001 - announce with the last known factor
                log.info("could not compute reliability: %s", e)
        if self.grid_source is not None:
            self.grid = await trio.to_thread.run_sync(self.grid_source.current, self.network.now())
        self._price_tier()
        info = self.info(state)
        assert self.model_id is not None  # run() set it up before serving
        acks = await self.dht.store(announce_key(self.model_id), info.to_value(), ttl=ttl, republish=False)
        if self.gossip is not None:
            await self.gossip.publish(GOSSIP_TOPIC, gossip_note(self.model_id, info, ttl))
        card = info.card(self.model_id)
        if info.online and card is not None:  # offline: the index entry lapses with its ttl
            await announce_model(self.dht, card, ttl)
        return acks

    async def _announce_loop(self) -> None:
        # Soon after start, announce again at 1, 2, 4, 8 ... s: a server that started first stored
        # its record only at itself, and the DHT does not hand records to peers that join later.
        fast = 1.0
        while True:
            if fast < self.config.announce_period:
                await trio.sleep(fast)
                fast *= 2
            else:
                await trio.sleep(self.config.announce_period)
            try:
                await self.announce()
            except P2PError as e:
                log.info("announcement failed: %s", e)

    async def _expire_loop(self) -> None:
        cfg = self.config
        first = min(cfg.first_step_timeout, cfg.session_timeout)
        period = max(0.05, min(5.0, first / 4, cfg.stranger_idle_timeout / 4))
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for s in list(self.sessions.values()):
                timeout = cfg.session_timeout if s.steps else first
                if not s.standing:  # a stranger mid-generation steps far more often
                    timeout = min(timeout, cfg.stranger_idle_timeout)
                if not s.compute_lock.locked() and now - s.last_used > timeout:
                    log.info("session %s of %s expired", s.id.hex()[:8], s.peer_id[-8:])
                    self.stats["expired"] += 1
                    s.scope.cancel()

    def status(self) -> dict:
        return {"model_id": self.model_id, "start": self.start, "end": self.end, "dtype": self.dtype_name,
                "throughput": self.throughput, "sessions": len(self.sessions), "cache_used_bytes": self.cache_used,
                "cache_budget_bytes": self.config.cache_budget_bytes,
                "stranger_cache_bytes": self.stranger_caps.per_client, "strangers_cache_bytes": self.stranger_caps.pool,
                "cache_tokens_left": self.cache_tokens_left() if self.mf else 0, "reliability": self.reliability,
                "batching": dict(self.batcher.stats),
                "tier": None if self.tier is None else {
                    "name": self.tier.tier, "milli": self.tier.announced_milli(time.time()),
                    "quarantine_until": self.tier.quarantine_until, "flops_per_s": self.flops_per_s},
                **({"billing": {**self.billing.stats, "rate": self.billing.rate}}
                   if self.billing is not None else {}), **self.stats}

    # --- sessions --------------------------------------------------------------------------------

    def _subspan(self, a: int, b: int) -> BlockSpan:
        sub = self._subspans.get((a, b))
        if sub is None:
            s = self.span
            assert s is not None  # run() set it up before serving
            sub = BlockSpan(s.cfg, a, b, s.blocks[a - s.start:b - s.start], dtype=s.dtype, device=s.device)
            if len(self._subspans) < 256:
                self._subspans[(a, b)] = sub
        return sub

    async def _handle_session(self, stream: Stream) -> None:
        """One stream = one session: open, steps, close. Errors are answered, never raised."""
        session: ServedSession | None = None
        with trio.CancelScope() as scope:
            try:
                while True:
                    msg = await stream.receive()
                    try:
                        m = expect_map(msg, "inference message")
                        kind = mfield(m, "t", str, max_len=16)
                        if kind == "open":
                            if session is not None:
                                raise InferenceError("SessionOpen", "a session is already open on this stream")
                            session = await self._open(stream, m, scope)
                            reply = {"t": "opened", "session": session.id, "start": session.span.start,
                                     "end": session.span.end, "max_length": session.max_length,
                                     "cache_tokens_left": self.cache_tokens_left()}
                            if session.account is not None:  # the rate its receipts must carry
                                reply["rate"] = session.account.rate
                        elif kind == "step":
                            if session is None:
                                raise InferenceError("NoSession", "no session is open on this stream: send 'open' first")
                            out = await self._step(session, m, pushed=False)
                            if out is None:
                                continue
                            reply = out
                        elif kind == "close":
                            if session is not None and session.account is not None and m.get("receipt") is not None:
                                try:
                                    session.account.check(m.get("receipt"), session.tokens, require=False)
                                except InferenceError as e:
                                    log.info("final receipt from %s refused: %s", stream.peer_id[-8:], e)
                            await self._send(session, stream, {"t": "closed"})
                            return
                        else:
                            raise InferenceError("BadRequest", f"unknown message type {kind!r}")
                    except (FrameError, InferenceError, CacheError) as e:
                        self.stats["errors"] += 1
                        reply = _error_reply(e)
                    await self._send(session, stream, reply)
            except P2PError as e:  # stream closed or broken: the session ends with it
                log.debug("session stream from %s ended: %s", stream.peer_id[-8:], e)
            finally:
                if session is not None:
                    self._drop(session)
                    if session.account is not None:
                        with trio.CancelScope(shield=True), trio.move_on_after(10.0):
                            await session.account.billing.end(session.account)  # the earn entry
        if scope.cancelled_caught and session is not None:
            with trio.move_on_after(1.0) as _:
                try:
                    await stream.send(error(session.end_kind, _END_MESSAGES[session.end_kind]))
                except P2PError:
                    pass

    async def _send(self, session: ServedSession | None, stream: Stream, msg: dict) -> None:
        if session is None:
            await stream.send(msg)
        else:
            async with session.send_lock:
                await stream.send(msg)

    async def _open(self, stream: Stream | None, m: dict, scope: trio.CancelScope) -> ServedSession:
        assert self.mf is not None and self.model_id is not None and self.start is not None and self.end is not None
        cfg = self.mf.config
        peer_id = self.network.peer_id if stream is None else stream.peer_id
        if self.stopping or self.span is None:
            raise InferenceError("ServerStopping", "this server is shutting down")
        model = mfield(m, "model", str, max_len=128)
        if model != self.model_id:
            raise InferenceError("ModelMismatch", f"this server serves model {self.model_id[:16]}, not {model[:16]}")
        a = int_field(m, "start", 0, cfg.num_layers)
        b = int_field(m, "end", 0, cfg.num_layers)
        if not (self.start <= a < b <= self.end):
            raise InferenceError("SpanNotServed", f"blocks [{a}, {b}) are not within the served span [{self.start}, {self.end})")
        limit = min(self.config.max_length, cfg.max_position_embeddings)
        max_length = mfield(m, "max_length", int)
        if not 1 <= max_length <= limit:
            raise InferenceError("BadMaxLength", f"max_length must be in [1, {limit}], got {max_length}", limit)
        dtype = mfield(m, "dtype", str, max_len=16)
        if dtype != self.dtype_name:
            raise InferenceError("DtypeMismatch", f"this server computes in {self.dtype_name}, not {dtype}")
        if len(self.sessions) >= self.config.max_sessions:
            self.stats["sessions_refused"] += 1
            raise InferenceError("TooManySessions", f"this server already holds {len(self.sessions)} sessions")
        mine = sum(s.peer_id == peer_id for s in self.sessions.values())
        if mine >= max(1, int(self.config.max_sessions * self.config.cache_share)):
            self.stats["sessions_refused"] += 1
            raise InferenceError("TooManySessions", f"this server already holds {mine} of your sessions, as many "
                                 "as one client may open")
        seed = mfield(m, "seed", bytes, max_len=SEED_LEN, optional=True)
        if seed is not None and len(seed) != SEED_LEN:
            raise InferenceError("BadRequest", f"'seed' must be {SEED_LEN} bytes")
        sid = secrets.token_bytes(proto.SESSION_ID_LEN)
        account = None
        if self.billing is not None:
            try:
                account = await self.billing.open(peer_id, session=sid, model=self.model_id, start=a, end=b,
                                                  idle=not self.sessions)
            except InferenceError:
                self.stats["sessions_refused"] += 1
                raise
        # our own client (in process) always has standing here; account None with billing: ourselves too
        standing = peer_id == self.network.peer_id or (self.billing is not None and (account is None or account.standing))
        per_token = KVCache.bytes_for(cfg, b - a, 1, dtype=self.dtype)
        opening = self.config.initial_cache_tokens if standing else self.config.stranger_open_cache_tokens
        capacity = min(max_length, opening)
        # without standing the whole max_length is booked now: the strangers' pool is small, and a cache
        # growing past a full pool would be refused mid-generation (which ends it) instead of at open
        need = (capacity if standing else max_length) * per_token
        try:
            self._check_room(peer_id, standing, max_length * per_token, per_token)  # it could finish here
            self._reserve(peer_id, standing, need, per_token)  # before the await: opens cannot overbook
            try:
                sub = self._subspan(a, b)
                cache = await self._in_thread(sub.new_cache, capacity)
            except BaseException:
                self.cache_used -= need
                raise
        except BaseException:
            if account is not None:
                account.billing.forget(account)
            raise
        session = ServedSession(sid, peer_id, sub, cache, max_length, dtype, stream, scope, need,
                                trio.current_time(), account=account, standing=standing, seed=seed,
                                inputs=InputChain(sid) if seed is not None else None)
        self.sessions[session.id] = session
        self.stats["sessions_opened"] += 1
        return session

    def _check_room(self, peer_id: str, standing: bool, nbytes: int, per_token: int) -> None:
        """Raise CacheFull unless `nbytes` more fit the client's share and the budget (and, without
        standing, the strangers' pool), after displacing idle sessions of other clients without
        standing. CacheFull's limit: the tokens that would fit."""
        budget = self.config.cache_budget_bytes
        idle = sum(s.nbytes for s in self._displaceable(peer_id, standing))
        free = budget - self.cache_used + idle
        if nbytes > free:
            self.stats["sessions_refused"] += 1
            raise InferenceError("CacheFull", f"the KV cache budget is full: {self.cache_used} of {budget} bytes "
                                 f"in use, this session needs {nbytes} more", max(0, free) // per_token)
        caps = self.stranger_caps
        share = int(budget * self.config.cache_share_standing) if standing else caps.per_client
        held = sum(s.nbytes for s in self.sessions.values() if s.peer_id == peer_id)
        if held + nbytes > share:
            self.stats["sessions_refused"] += 1
            raise InferenceError("CacheFull", f"a client {'with' if standing else 'without'} standing here may hold "
                                 f"{share} bytes of this server's KV cache; you hold {held}, this session needs "
                                 f"{nbytes} more", max(0, share - held) // per_token)
        if standing:
            return
        strangers = self._strangers_bytes()
        if strangers - idle + nbytes > caps.pool:
            self.stats["sessions_refused"] += 1
            raise InferenceError("CacheFull", f"clients without standing here may hold {caps.pool} bytes of this "
                                 f"server's KV cache together; they hold {strangers} ({idle} of it idle), this "
                                 f"session needs {nbytes} more", max(0, caps.pool - strangers + idle) // per_token)

    def _reserve(self, peer_id: str, standing: bool, nbytes: int, per_token: int) -> None:
        """Count `nbytes` more of KV cache for a session of `peer_id`, displacing the longest-idle
        sessions of other clients without standing while it would not fit (the budget, and without
        standing the strangers' pool); CacheFull if it does not fit even so."""
        self._check_room(peer_id, standing, nbytes, per_token)
        budget, pool = self.config.cache_budget_bytes, self.stranger_caps.pool
        for s in sorted(self._displaceable(peer_id, standing), key=lambda s: s.last_used):
            if self.cache_used + nbytes <= budget and (standing or self._strangers_bytes() + nbytes <= pool):
                break
            log.info("session %s of %s displaced (idle, no standing)", s.id.hex()[:8], s.peer_id[-8:])
            self.stats["displaced"] += 1
            s.end_kind = proto.DISPLACED
            self._drop(s)
            s.scope.cancel()
        self.cache_used += nbytes

    def _displaceable(self, peer_id: str, standing: bool) -> list[ServedSession]:
        """Sessions of clients without standing, other than `peer_id`, that are idle (no step running, none
        lately): for a client without `standing`, only those that never stepped or have been idle longer
        than a generation's gap between steps."""
        now, cfg = trio.current_time(), self.config
        return [s for s in self.sessions.values() if not s.standing and s.peer_id != peer_id
                and not s.compute_lock.locked() and now - s.last_used >= cfg.displace_idle_after
                and (standing or not s.steps or now - s.last_used >= cfg.stranger_displace_idle_after)]

    def _strangers_bytes(self) -> int:
        return sum(s.nbytes for s in self.sessions.values() if not s.standing)

    def _drop(self, session: ServedSession) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.cache_used -= session.nbytes

    async def _step(self, session: ServedSession, m: dict, *, pushed: bool) -> dict | None:
        """Run one step (or a replay of several) of `session`; the "out" reply, or None for a stale push."""
        assert self.mf is not None  # run() set it up before serving
        step_id = int_field(m, "id", 0, 1 << 62)
        pos = int_field(m, "pos", 0, session.max_length)
        hidden = unpack_hidden(mfield(m, "h", dict), dtype=session.dtype, hidden_size=self.mf.config.hidden_size,
                               max_tokens=session.max_length)
        n = hidden.shape[1]
        chunks = proto.parse_chunks(m.get("chunks"), n)
        push = proto.parse_push(m.get("push"))
        push_receipts = [h.get("receipt") for h in m["push"]] if push else []  # forwarded as signed
        next_hop = await self._next_hop(session, push[0][0]) if push else None
        ran = await self._run(session, step_id, pos, hidden, chunks, m.get("receipt"), pushed=pushed)
        if ran is None:
            return None
        out, compute_s, served, signed = ran
        packed = pack_hidden(out)
        if next_hop is not None and self._nursery is not None:
            self._nursery.start_soon(self._push, push, next_hop, step_id, pos, packed, push_receipts)
        reply = {"t": "out", "id": step_id, "h": packed, "compute_s": compute_s, "pushed": bool(push), "served": served}
        if session.seed is not None and signed is not None:
            assert self.model_id is not None  # run() set it before serving
            input_digest, output_digest, output_fingerprint = signed
            reply["signed"] = sign_step(
                self.network.identity, model=self.model_id, start=session.span.start, end=session.span.end,
                dtype=session.dtype, session=session.id, step=step_id, pos=pos, chunks=chunks,
                input_digest=input_digest, output_digest=output_digest, output_fingerprint=output_fingerprint,
                seed=session.seed).to_wire()
        return reply

    async def _run(self, session: ServedSession, step_id: int, pos: int, hidden: torch.Tensor, chunks: list[int],
                   receipt: Any, *, pushed: bool) -> tuple[torch.Tensor, float, int, tuple[bytes, bytes, bytes] | None] | None:
        """Compute a step of `session`, paid for first: (outputs, compute seconds, tokens served so far,
        (input digest, output digest, fingerprint) when steps are signed), or None for a stale push."""
        n = hidden.shape[1]
        async with session.compute_lock:
            if step_id < session.last_step:
                if pushed:
                    return None  # a late push for a step the client already redid directly
                raise InferenceError("StaleStep", f"step {step_id} is older than step {session.last_step}")
            if pos > session.cache.length:
                raise InferenceError("BadPosition", f"position {pos} is past the {session.cache.length} tokens "
                                     "this session holds (replay the history first)")
            if pos + n > session.max_length:
                raise InferenceError("MaxLengthExceeded", f"{pos + n} tokens exceed the session's max_length "
                                     f"of {session.max_length}", session.max_length)
            session.last_used = trio.current_time()
            account = session.account
            paid_before = None
            billed = session.tokens - proto.refunded_tokens(session.last_pos, session.last_tokens, pos)
            if account is not None:  # paid for before any work: the receipt covers this step too
                paid_before = await account.billing.commit(
                    account, receipt, served=billed, step_tokens=n,
                    idle=all(s.peer_id == session.peer_id for s in self.sessions.values()))
            try:
                capacity = session.cache.capacity
                if pos + n > capacity:  # the cache grows with what the session uses
                    capacity = min(session.max_length, max(pos + n, 2 * capacity))
                    per_token = session.span.cache_bytes(1)
                    extra = capacity * per_token - session.nbytes
                    if extra > 0:  # a session without standing booked its max_length at open
                        self._reserve(session.peer_id, session.standing, extra, per_token)
                        session.nbytes += extra
                priority = math.inf if account is None else await account.billing.priority(account)
                seed = session.seed

                def digests(result: torch.Tensor) -> tuple[bytes, bytes, bytes] | None:
                    # what signing needs of the tensors, hashed and projected in the worker thread
                    return (tensor_digest(hidden), *result_digests(result, seed)) if seed is not None else None

                done = BatchStep(session.span, session.cache, hidden, pos, chunks, capacity, digests, priority)
                try:
                    await self.batcher.submit(done)
                finally:
                    session.cache = done.cache  # grown, even when the step then failed
            except BaseException:
                if account is not None:
                    account.rollback(paid_before)
                raise
            assert done.outputs is not None  # submit raises the step's error otherwise
            out, compute_s, step_digests = done.outputs, done.compute_s, done.after_value
            session.last_step = step_id
            session.last_used = trio.current_time()
            session.last_pos, session.last_tokens = pos, n
            session.tokens = billed + n
            served = session.tokens
            signed = None
            if step_digests is not None and session.inputs is not None:
                inputs_digest, output_digest, output_fingerprint = step_digests
                signed = (session.inputs.add(pos, chunks, inputs_digest), output_digest, output_fingerprint)
        session.steps += 1
        if account is not None and account.due(account.billing.clock()) and self._nursery is not None:
            self._nursery.start_soon(account.billing.settle, account)  # periodic earn entry (long sessions)
        self.stats["steps"] += 1
        self.stats["tokens"] += n
        return out, compute_s, served, signed

    # --- sessions of a client in this process (pipeline/hop.py LocalHop) -------------------------

    async def open_local(self, model: str, start: int, end: int, max_length: int, dtype: str) -> InProcessSession:
        """A session for this peer's own client: admitted like a stream's "open" (the same refusals, as
        InferenceErrors) but with no stream — its steps are calls (`InProcessSession.run`). It ends like
        any session (idle, a move, shutdown) or at `InProcessSession.close`."""
        if self._nursery is None:
            raise InferenceError("ServerStopping", "this server is not serving")
        m = {"model": model, "start": start, "end": end, "max_length": max_length, "dtype": dtype}
        return InProcessSession(self, await self._nursery.start(self._hold_local, m))

    async def _hold_local(self, m: dict, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:  # what expiry, a move and shutdown cancel
            session = await self._open(None, m, scope)
            try:
                task_status.started(session)
                await trio.sleep_forever()
            finally:
                self._drop(session)

    # --- server-to-server forwarding -------------------------------------------------------------

    async def _next_hop(self, session: ServedSession, peer_id: str) -> ServerInfo:
        """The announcement of `peer_id` if it is a current server of the block after `session`'s span
        (read again from the DHT, at most every `announcement_refresh` s, when not known); else
        InferenceError("PushRefused"): we forward only to servers the swarm announces, never to an
        address a client names."""
        block = session.span.end
        info = await self._announcement(peer_id)
        if info is None or not info.online or not info.covers(block):
            self.stats["pushes_refused"] += 1
            raise InferenceError("PushRefused", f"peer {peer_id[-12:]} has no current announcement serving block "
                                 f"{block} of this model (pushes go only to announced servers)")
        return info

    async def _announcement(self, peer_id: str) -> ServerInfo | None:
        assert self.mf is not None and self.model_id is not None  # only serving servers forward
        async with self._announced_lock:
            info = self._announced.get(peer_id)
            now = self.network.now()
            if (info is None or info.expires <= now) and now - self._announced_at >= self.config.announcement_refresh:
                self._announced_at = now
                try:
                    servers = await fetch_servers(self.dht, self.model_id, num_blocks=self.mf.config.num_layers)
                except P2PError as e:
                    log.info("could not read the swarm's announcements: %s", e)
                    servers = []
                self._announced = {s.peer_id: s for s in servers}
                info = self._announced.get(peer_id)
        return info if info is not None and info.expires > self.network.now() else None

    async def _push(self, push: list[tuple[str, bytes]], next_hop: ServerInfo, step_id: int, pos: int, packed: dict,
                    receipts: list | None = None) -> None:
        (peer, sid), rest = push[0], push[1:]
        receipts = receipts or [None] * len(push)
        msg = {"t": "push", "session": sid, "id": step_id, "pos": pos, "h": packed,
               "push": [{"peer": p, "session": s, **({"receipt": r} if r is not None else {})}
                        for (p, s), r in zip(rest, receipts[1:])]}
        if receipts[0] is not None:
            msg["receipt"] = receipts[0]
        lock = self._push_locks.setdefault(peer, trio.Lock())
        try:
            with trio.fail_after(self.config.push_timeout):
                async with lock:
                    stream = self._push_streams.get(peer)
                    if stream is None:
                        stream = self._push_streams[peer] = await self._open_push(next_hop)
                    try:
                        await stream.send(msg)
                    except P2PError:
                        self._push_streams.pop(peer, None)
                        stream = self._push_streams[peer] = await self._open_push(next_hop)
                        await stream.send(msg)
            self.stats["pushes_sent"] += 1
        except (P2PError, trio.TooSlowError) as e:
            self._push_streams.pop(peer, None)
            self.stats["push_failures"] += 1
            log.info("push to %s failed: %s (the client falls back)", peer[-8:], e)

    async def _open_push(self, next_hop: ServerInfo) -> Stream:
        """A push stream to `next_hop`'s server; when not connected, dialled first at the addresses it
        announced (signed by itself; those we may dial, staggered: `connect_announced`)."""
        peer = next_hop.peer_id
        if next_hop.addrs and peer not in self.network.connected_peers():
            await connect_announced(self.network, peer, next_hop.addrs,
                                    each=self.config.push_timeout / len(next_hop.addrs))
        return await self.network.open_stream(peer, proto.PUSH)

    async def _handle_push(self, stream: Stream) -> None:
        """Steps pushed by the previous server of a route; the answer goes on the session's own stream."""
        try:
            while True:
                msg = await stream.receive()
                self.stats["pushes_received"] += 1
                try:
                    m = expect_map(msg, "push")
                    if mfield(m, "t", str, max_len=16) != "push":
                        raise FrameError("push streams carry only 'push' messages")
                    sid = mfield(m, "session", bytes, max_len=proto.SESSION_ID_LEN)
                except FrameError as e:
                    log.info("bad push from %s: %s", stream.peer_id[-8:], e)
                    continue
                session = self.sessions.get(sid)
                if session is None or session.stream is None:  # none, or our own client's (no stream)
                    log.info("push from %s for an unknown session", stream.peer_id[-8:])
                    continue
                if self._nursery is not None:
                    self._nursery.start_soon(self._run_pushed, session, session.stream, m)
        except P2PError:
            pass

    async def _run_pushed(self, session: ServedSession, reply_to: Stream, m: dict) -> None:
        try:
            reply = await self._step(session, m, pushed=True)
        except (FrameError, InferenceError, CacheError) as e:
            self.stats["errors"] += 1
            reply = _error_reply(e)
        if reply is None or session.id not in self.sessions:
            return
        try:
            await self._send(session, reply_to, reply)
        except P2PError:
            session.scope.cancel()


@dataclass
class InProcessSession:
    """A session of this peer's own client (`BlockServer.open_local`): steps are calls, not messages."""

    server: BlockServer
    session: ServedSession

    @property
    def id(self) -> bytes:
        return self.session.id

    async def run(self, hidden: torch.Tensor, pos: int, chunks: list[int] | None = None) -> tuple[torch.Tensor, float]:
        """A step (or a replay of several, `chunks`) computed in this process: (outputs, compute seconds);
        the same checks as a step message, raised as InferenceErrors."""
        s = self.session
        if s.id not in self.server.sessions:
            raise InferenceError(s.end_kind, _END_MESSAGES[s.end_kind])
        ran = await self.server._run(s, s.last_step + 1, pos, hidden, chunks or [hidden.shape[1]], None, pushed=False)
        assert ran is not None  # only pushes are ever stale
        out, compute_s, _, _ = ran
        return out, compute_s

    def close(self) -> None:
        self.server._drop(self.session)
        self.session.scope.cancel()


_END_MESSAGES = {proto.SESSION_EXPIRED: "the server closed this session (idle, moved or stopping)",
                 proto.DISPLACED: "the server gave this idle session's cache to another client"}


def _error_reply(e: FrameError | InferenceError | CacheError) -> dict:
    if isinstance(e, InferenceError):
        return error(e.kind, e.message, e.limit)
    return error("CacheError" if isinstance(e, CacheError) else "BadRequest", str(e))


async def _refuse_stopped(stream: Stream) -> None:
    try:
        await stream.send(error("ServerStopping", "this server is not serving"))
    except P2PError:
        pass
