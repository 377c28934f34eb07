"""Peak RSS of loading part of a model, measured in a fresh subprocess (no psutil needed).

    python -m pipeline.measure FOLDER [--blocks a:b | --head | --full] [--dtype float32]

prints JSON {"what", "peak_rss_bytes", "baseline_rss_bytes", "loaded_tensors"}: baseline is the
same interpreter after importing torch and our modules, before reading any weight. After loading
it runs one 8-token forward pass, so the figure is the steady state of a serving peer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _peak() -> int:
    """Peak RSS of this process image. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss
    does not (a child forked from a big parent would report the parent's peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_rss(folder: str, what: str, dtype: str = "float32") -> dict:
    """Run the load in a child process; what = 'a:b' | 'head' | 'full'."""
    out = subprocess.run([sys.executable, "-m", "pipeline.measure", str(folder), "--what", what, "--dtype", dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def span_throughput(span, *, prefill_tokens: int = 64, decode_steps: int = 16, repeats: int = 2) -> dict:
    """A server's own speed, per block: prefill and decode tokens/s (best of `repeats`), for announcing.

    Times `span.forward` on random hidden states with a fresh cache: one prefill of
    `prefill_tokens`, then `decode_steps` single-token steps. Per-block figures multiply by the
    span's length (a span of k blocks at t tok/s does k·t block-tokens/s).
    """
    import time

    import torch

    cfg = span.cfg
    best_p = best_d = float("inf")
    for _ in range(repeats):
        cache = span.new_cache(prefill_tokens + decode_steps)
        x = torch.randn(1, prefill_tokens, cfg.hidden_size, dtype=span.dtype, device=span.device)
        t0 = time.perf_counter()
        y = span.forward(x, cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        for _ in range(decode_steps):
            y = span.forward(y[:, -1:], cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        best_p, best_d = min(best_p, t1 - t0), min(best_d, (t2 - t1) / decode_steps)
    n = len(span)
    return {"prefill_tokens_per_s_per_block": prefill_tokens * n / best_p,
            "decode_tokens_per_s_per_block": n / best_d,
            "blocks": n, "prefill_tokens": prefill_tokens, "decode_steps": decode_steps}


def batch_throughput(span, sizes=(1, 2, 4, 8), *, context: int = 32, steps: int = 8, repeats: int = 2) -> dict:
    """Decode tokens/s through ONE block of `span` (aggregate over the batch) when `b` sessions step
    together, for each b in `sizes`: b caches holding `context` tokens each, then `steps` rounds of one
    new token per session, as one `forward_batch` (b = 1: `forward`, what a lone step runs). Best of
    `repeats`. What continuous batching gains on this machine, independent of any network."""
    import time

    import torch

    cfg = span.cfg
    out = {}
    for b in sizes:
        best = float("inf")
        for _ in range(repeats):
            caches = [span.new_cache(context + steps) for _ in range(b)]
            xs = [torch.randn(1, context, cfg.hidden_size, dtype=span.dtype, device=span.device) for _ in range(b)]
            ys = [span.forward(x, c)[:, -1:] for x, c in zip(xs, caches)]
            t0 = time.perf_counter()
            for _ in range(steps):
                if b == 1:
                    ys = [span.forward(ys[0], caches[0])]
                else:
                    ys = span.forward_batch([(y, c, None) for y, c in zip(ys, caches)])
            if span.device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / steps)
        out[b] = b * len(span) / best
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--what", default="full", help="a:b (a server's span), head (a client), full")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    import torch  # noqa: F401  (counted in the baseline)

    from .loading import ModelFolder, load_head, load_span
    from .model import BlockSpan, ModelHead

    mf = ModelFolder(a.folder)
    base = _peak()
    objs: list[ModelHead | BlockSpan]
    if a.what == "head":
        objs = [load_head(mf, dtype=a.dtype, device="cpu")]
    elif a.what == "full":
        objs = [load_head(mf, dtype=a.dtype, device="cpu"), load_span(mf, 0, mf.config.num_layers, dtype=a.dtype, device="cpu")]
    else:
        s, e = (int(x) for x in a.what.split(":"))
        objs = [load_span(mf, s, e, dtype=a.dtype, device="cpu")]
    # one forward pass of 8 tokens so every weight page is really resident (safetensors maps lazily)
    with torch.inference_mode():
        h = None
        for o in objs:
            if isinstance(o, ModelHead):
                h = o.embed(torch.arange(8)[None])
                o.logits(h)
            else:
                x = torch.randn(1, 8, mf.config.hidden_size) if h is None else h
                h = o.forward(x, o.new_cache(8))
    print(json.dumps({"what": a.what, "peak_rss_bytes": _peak(), "baseline_rss_bytes": base,
                      "loaded_tensors": len(mf.loaded), "objects": len(objs)}))


if __name__ == "__main__":
    main()
