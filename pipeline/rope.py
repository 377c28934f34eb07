"""Rotary position embeddings: inverse frequencies per rope type, cos/sin for a run of positions.

Follows transformers' own formulas (default, linear, llama3, yarn) so our blocks agree with HF's
to float rounding. cos/sin are computed in float32 and cast to the activation dtype, as HF does.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    r = cfg.rope
    base = float(r["rope_theta"])
    dim = int(cfg.head_dim * float(r.get("partial_rotary_factor", 1.0)))
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = r.get("rope_type", "default")
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(r["factor"]), 1.0
    if kind == "llama3":
        factor = float(r["factor"])
        low, high = float(r["low_freq_factor"]), float(r["high_freq_factor"])
        old = float(r["original_max_position_embeddings"])
        low_wl, high_wl = old / low, old / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out), 1.0
    if kind == "yarn":
        given = r.get("factor")
        orig = float(r["original_max_position_embeddings"])
        factor = float(given if given is not None else cfg.max_position_embeddings / orig)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn = r.get("attention_factor")
        if attn is None:
            if r.get("mscale") and r.get("mscale_all_dim"):
                attn = mscale(factor, r["mscale"]) / mscale(factor, r["mscale_all_dim"])
            else:
                attn = mscale(factor)
        beta_fast, beta_slow = r.get("beta_fast") or 32, r.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if r.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
        return inv, float(attn)
    raise ValueError(f"rope type {kind!r} is not supported")


class Rotary:
    """cos/sin tables for positions [start, start + n), on one device."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu"):
        inv, self.scale = inv_freq_and_scale(cfg)
        self.inv_freq = inv.to(device)
        self.rot_dim = 2 * inv.numel()

    def cos_sin(self, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, n, head_dim]; cos/sin: [n, rot_dim] (rot_dim ≤ head_dim, rest passes through)."""
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        xr, xp = x[..., :rd], x[..., rd:]
        return torch.cat((apply_rotary(xr, cos, sin), xp), dim=-1)
    half = rd // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
