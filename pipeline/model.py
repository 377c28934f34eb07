"""Our decoder math in plain torch: blocks, spans of blocks with an explicit KV cache, the client head.

A server holds a `BlockSpan` (blocks [start, end) of the model) and one `KVCache` per inference
session; `span.forward(hidden, cache)` takes hidden states [batch, new_tokens, hidden] at positions
[cache.length, cache.length + new_tokens), appends their keys/values to the cache and returns the
span's output hidden states; `span.forward_batch([(hidden, cache, position), ...])` runs the steps
of several sessions as one forward (projections and MLP over their stacked tokens, attention per
session against its own cache). A client holds a `ModelHead` (embeddings, final norm, LM head).
`LocalModel` chains a head and spans in one process (tests, benchmarks, local fallback).

The math mirrors transformers' Llama / Qwen2 / Mistral modules (RMSNorm in float32, rotate-half
rotary embeddings, GQA, SwiGLU) so logits agree with HF's to float rounding; tests prove it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .rope import Rotary, apply_rotary


class CacheError(ValueError):
    """A KV cache was used past its capacity, at the wrong position, or with the wrong shape."""


class KVCache:
    """Keys and values of one session for the blocks of one span, preallocated to `capacity` tokens.

    Explicit tensors: k[i], v[i] are [batch, kv_heads, capacity, head_dim] for the span's i-th block;
    positions [0, length) are filled. `nbytes` is what it costs whether full or not (servers budget
    with it); `trim(n)` forgets everything from position n on (to replay or roll back).
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, capacity: int, *, batch: int = 1,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if capacity <= 0 or batch <= 0:
            raise CacheError("cache capacity and batch must be positive")
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.capacity = capacity
        self.batch = batch
        self.length = 0

    @staticmethod
    def bytes_for(cfg: ModelConfig, num_blocks: int, capacity: int, *, batch: int = 1,
                  dtype: torch.dtype = torch.float32) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * num_blocks * batch * cfg.num_kv_heads * capacity * cfg.head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def trim(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise CacheError(f"cannot trim a cache of {self.length} tokens to {length}")
        self.length = length


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def attention_mask(start: int, n: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [n, start + n] mask (True = attend) for queries at positions start..start+n-1."""
    total = start + n
    if window is None and n == 1:
        return None  # one query sees every cached position
    q = torch.arange(start, total, device=device)[:, None]
    k = torch.arange(total, device=device)[None, :]
    allowed = k <= q
    if window is not None:
        allowed &= k > q - window
    return allowed


class Block:
    """One decoder block: pre-norm attention (GQA + rotary) and pre-norm SwiGLU MLP, both residual."""

    def __init__(self, cfg: ModelConfig, index: int, w: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.index = index
        self.window = cfg.sliding_windows[index] if cfg.sliding_windows else None
        w = dict(w)
        # q/k/v and gate/up run as one matmul each; the loader reads them pre-fused ("qkv",
        # "gate_up"); given separately they are fused here and the unfused tensors dropped
        if "qkv" not in w:
            w["qkv"] = torch.cat([w.pop("q"), w.pop("k"), w.pop("v")], dim=0)
            if cfg.qkv_bias:
                w["qkv_bias"] = torch.cat([w.pop("q_bias"), w.pop("k_bias"), w.pop("v_bias")])
        if "gate_up" not in w:
            w["gate_up"] = torch.cat([w.pop("gate"), w.pop("up")], dim=0)
            if cfg.mlp_bias:
                w["gate_up_bias"] = torch.cat([w.pop("gate_bias"), w.pop("up_bias")])
        self.qkv, self.qkv_bias = w.pop("qkv"), w.pop("qkv_bias", None)
        self.gate_up, self.gate_up_bias = w.pop("gate_up"), w.pop("gate_up_bias", None)
        self.w = w

    def forward(self, x: torch.Tensor, cache: KVCache, slot: int, start: int,
                cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._qkv(x, cos, sin)
        a = self._attend(q, k, v, cache, slot, start, mask)
        return self._finish(x, a.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.cfg.q_size))

    def forward_ragged(self, x: torch.Tensor, parts: list["_Part"], cos: torch.Tensor, sin: torch.Tensor,
                       slot: int) -> torch.Tensor:
        """x [1, T, hidden]: the new tokens of several sessions side by side (`parts` say whose, in
        order); projections and MLP run once over all T, attention per session against its own cache."""
        cfg = self.cfg
        q, k, v = self._qkv(x, cos, sin)
        outs = []
        for p in parts:
            window = self.window if (self.window is not None and p.start + p.n > self.window) else None
            mask = p.masks[window] if window in p.masks else p.mask(window)
            a = self._attend(q[:, :, p.off:p.off + p.n], k[:, :, p.off:p.off + p.n], v[:, :, p.off:p.off + p.n],
                             p.cache, slot, p.start, mask)
            outs.append(a.transpose(1, 2).reshape(1, p.n, cfg.q_size))
        return self._finish(x, torch.cat(outs, dim=1))

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cfg = self.cfg
        b, n, _ = x.shape
        h = rms_norm(x, self.w["attn_norm"], cfg.rms_norm_eps)
        qkv = F.linear(h, self.qkv, self.qkv_bias)
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(b, n, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = k.view(b, n, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = v.view(b, n, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, slot: int, start: int,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Append k/v at [start, start + n) of the cache; q's attention over the cache up to there."""
        cfg = self.cfg
        n = q.shape[2]
        end = start + n
        cache.k[slot][:, :, start:end] = k
        cache.v[slot][:, :, start:end] = v
        keys = cache.k[slot][:, :, :end]
        values = cache.v[slot][:, :, :end]
        if mask is None and n > 1:  # window-free prefill from position 0: plain causal
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True,
                                                  scale=cfg.head_dim ** -0.5)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True,
                                              scale=cfg.head_dim ** -0.5)

    def _finish(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The output projection, residual, and the MLP block, over a [b, n, q_size] attention output."""
        cfg, w = self.cfg, self.w
        x = x + F.linear(a, w["o"], w.get("o_bias"))
        h = rms_norm(x, w["mlp_norm"], cfg.rms_norm_eps)
        gate, up = F.linear(h, self.gate_up, self.gate_up_bias).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, w["down"], w.get("down_bias"))


@dataclass
class _Part:
    """One session's share of a ragged batch: its tokens x[:, off:off + n] at positions [start, start + n)."""

    off: int
    n: int
    start: int
    cache: KVCache
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    def mask(self, window: int | None) -> torch.Tensor | None:
        m = self.masks[window] = (attention_mask(self.start, self.n, window, self.cache.k[0].device)
                                  if (self.start > 0 or window is not None) else None)
        return m


class BlockSpan:
    """Blocks [start, end) of a model; what a server serves."""

    def __init__(self, cfg: ModelConfig, start: int, end: int, blocks: list[Block], *,
                 dtype: torch.dtype, device: torch.device):
        if not (0 <= start < end <= cfg.num_layers) or len(blocks) != end - start:
            raise ValueError(f"bad span [{start}, {end}) for a model of {cfg.num_layers} blocks")
        self.cfg, self.start, self.end, self.blocks = cfg, start, end, blocks
        self.dtype, self.device = dtype, device
        self.rotary = Rotary(cfg, device)
        self.loaded_tensors: list[str] = []  # checkpoint names read to build this span (set by the loader)

    def __len__(self) -> int:
        return self.end - self.start

    def new_cache(self, capacity: int, batch: int = 1) -> KVCache:
        return KVCache(self.cfg, len(self), capacity, batch=batch, dtype=self.dtype, device=self.device)

    def cache_bytes(self, capacity: int, batch: int = 1) -> int:
        return KVCache.bytes_for(self.cfg, len(self), capacity, batch=batch, dtype=self.dtype)

    def grown(self, cache: KVCache, capacity: int) -> KVCache:
        """A copy of `cache` with room for `capacity` tokens (what it holds is copied bit for bit)."""
        new = self.new_cache(capacity, cache.batch)
        n = cache.length
        for dst, src in zip(new.k + new.v, cache.k + cache.v):
            dst[:, :, :n] = src[:, :, :n]
        new.length = n
        return new

    def _check(self, hidden: torch.Tensor, cache: KVCache, position: int | None) -> int:
        """The step's start position, after checking shapes and room (CacheError); nothing is changed."""
        cfg = self.cfg
        if hidden.dim() != 3 or hidden.shape[-1] != cfg.hidden_size:
            raise CacheError(f"hidden states must be [batch, tokens, {cfg.hidden_size}], got {list(hidden.shape)}")
        b, n, _ = hidden.shape
        if b != cache.batch or len(cache.k) != len(self):
            raise CacheError(f"cache is for batch {cache.batch} × {len(cache.k)} blocks, got batch {b} for {len(self)} blocks")
        start = cache.length if position is None else position
        if start > cache.length:
            raise CacheError(f"position {start} is past the cache's {cache.length} tokens")
        if start + n > cache.capacity:
            raise CacheError(f"{start + n} tokens exceed the session's cache of {cache.capacity}")
        return start

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: KVCache, position: int | None = None) -> torch.Tensor:
        """hidden [batch, new, hidden_size] at positions [position, position + new) → the span's output.

        `position` defaults to `cache.length`; a smaller one first trims the cache (a step re-run
        after a rollback), a larger one is an error. The cache grows by `new` tokens.
        """
        start = self._check(hidden, cache, position)
        n = hidden.shape[1]
        if n == 0:
            return hidden
        cache.trim(start)
        x = hidden.to(device=self.device, dtype=self.dtype)
        cos, sin = self.rotary.cos_sin(start, n, self.dtype)
        masks: dict[int | None, torch.Tensor | None] = {}
        for slot, block in enumerate(self.blocks):
            win = block.window if (block.window is not None and start + n > block.window) else None
            if win not in masks:
                masks[win] = attention_mask(start, n, win, self.device) if (start > 0 or win is not None) else None
            x = block.forward(x, cache, slot, start, cos, sin, masks[win])
        cache.length = start + n
        return x

    @torch.inference_mode()
    def forward_batch(self, steps: list[tuple[torch.Tensor, KVCache, int | None]]) -> list[torch.Tensor]:
        """Several sessions' steps as one forward: each (hidden [1, n_i, hidden_size], its own cache,
        position) → its output, equal to `forward` of that step alone up to float rounding.

        The new tokens of all steps are stacked (ragged, no padding) for the projections and the MLP;
        attention runs per step against its own cache. Each cache must appear once. A step that does
        not fit its cache raises CacheError before any cache is touched."""
        if len({id(c) for _, c, _ in steps}) != len(steps):
            raise CacheError("a batch holds each session's cache once")
        for hidden, cache, _ in steps:
            if hidden.dim() != 3 or hidden.shape[0] != 1:
                raise CacheError(f"a batched step is one sequence [1, tokens, hidden], got {list(hidden.shape)}")
        starts = [self._check(h, c, p) for h, c, p in steps]
        parts, off = [], 0
        for (hidden, cache, _), start in zip(steps, starts):
            parts.append(_Part(off, hidden.shape[1], start, cache))
            off += hidden.shape[1]
        live = [p for p in parts if p.n]
        for p in live:
            p.cache.trim(p.start)
        if live:
            x = torch.cat([h.to(device=self.device, dtype=self.dtype) for h, _, _ in steps], dim=1)
            tables = [self.rotary.cos_sin(p.start, p.n, self.dtype) for p in parts]
            cos = torch.cat([c for c, _ in tables], dim=0)
            sin = torch.cat([s for _, s in tables], dim=0)
            for slot, block in enumerate(self.blocks):
                x = block.forward_ragged(x, live, cos, sin, slot)
            for p in live:
                p.cache.length = p.start + p.n
        else:
            x = torch.cat([h for h, _, _ in steps], dim=1)
        return [x[:, p.off:p.off + p.n] for p in parts]


class ModelHead:
    """Client side: token embeddings in, logits out (final RMSNorm + LM head, possibly tied)."""

    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor | None, *,
                 dtype: torch.dtype, device: torch.device):
        self.cfg, self.embed_weight, self.norm_weight = cfg, embed, norm
        self.lm_head_weight = embed if lm_head is None else lm_head
        self.dtype, self.device = dtype, device
        self.loaded_tensors: list[str] = []

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, n] → hidden [batch, n, hidden_size]."""
        ids = torch.as_tensor(input_ids, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size})")
        return F.embedding(ids, self.embed_weight)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, n, hidden_size] (output of the last block) → logits [batch, n, vocab]."""
        h = rms_norm(hidden.to(device=self.device, dtype=self.dtype), self.norm_weight, self.cfg.rms_norm_eps)
        return F.linear(h, self.lm_head_weight)


@dataclass
class LocalSession:
    caches: list[KVCache]

    @property
    def length(self) -> int:
        return self.caches[0].length


class LocalModel:
    """A head and consecutive spans covering all blocks, in one process."""

    def __init__(self, head: ModelHead, spans: list[BlockSpan]):
        cfg = head.cfg
        at = 0
        for s in spans:
            if s.start != at:
                raise ValueError(f"spans must be consecutive from block 0; got one starting at {s.start}, expected {at}")
            at = s.end
        if at != cfg.num_layers:
            raise ValueError(f"spans cover blocks [0, {at}) of {cfg.num_layers}")
        self.cfg, self.head, self.spans = cfg, head, spans

    def new_session(self, capacity: int, batch: int = 1) -> LocalSession:
        return LocalSession([s.new_cache(capacity, batch) for s in self.spans])

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, session: LocalSession) -> torch.Tensor:
        """Feed new tokens [batch, n]; return their logits [batch, n, vocab]."""
        h = self.head.embed(input_ids)
        for span, cache in zip(self.spans, session.caches):
            h = span.forward(h, cache)
        return self.head.logits(h)

    @torch.inference_mode()
    def generate_greedy(self, input_ids: list[int] | torch.Tensor, max_new_tokens: int,
                        eos_token_id: int | list[int] | None = None) -> list[int]:
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1)
        session = self.new_session(ids.shape[1] + max_new_tokens)
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        out: list[int] = []
        logits = self.step(ids, session)
        for _ in range(max_new_tokens):
            tok = int(logits[0, -1].argmax())
            out.append(tok)
            if tok in stops:
                break
            logits = self.step(torch.tensor([[tok]]), session)
        return out
