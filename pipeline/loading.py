"""Lazy loading: read only the tensors a server's blocks (or a client's head) need.

`ModelFolder` opens an HF causal-LM folder (config.json + model.safetensors, or a sharded
model.safetensors.index.json) and maps each tensor name to its file by reading only the
safetensors headers. `load_span` / `load_head` then read tensor by tensor (each tensor's byte
range, with plain file reads: see `_read_tensor`), so a server serving k of n blocks reads and
holds about k/n of the weights; `loaded_tensors` on the result lists exactly what was read.

Default placement: CUDA when available, else CPU; default dtype float32 (bfloat16 optional).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from .config import ModelConfig, ModelConfigError
from .families import Family, family_of, ignored
from .model import Block, BlockSpan, LocalModel, ModelHead

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
MAX_HEADER = 100 * 1024 * 1024
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}


# weights our Block runs as one matmul, read straight into one tensor
FUSED = {"qkv": ("q", "k", "v"), "qkv_bias": ("q_bias", "k_bias", "v_bias"),
         "gate_up": ("gate", "up"), "gate_up_bias": ("gate_bias", "up_bias")}


class WeightsError(ModelConfigError):
    """Safetensors files are missing, malformed, or lack a tensor the model needs."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} is not supported; use float32 or bfloat16") from None


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file and the byte offset where its data begins."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise WeightsError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise WeightsError(f"{path}: safetensors header of {n} bytes is too large")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: bad safetensors header")
    return header, 8 + n


def resolve_model(model: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (when a hub is reachable)."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise ModelConfigError(f"model {str(model)!r} is not a model folder (and not a hub id owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - any hub failure is reported the same way
        raise ModelConfigError(f"could not fetch {model!r} from the hub: {e}") from None


class ModelFolder:
    """An HF model folder: its config, its family adapter and where each tensor lives."""

    def __init__(self, model: str | os.PathLike):
        self.path = resolve_model(model)
        self.config = ModelConfig.load(self.path)
        self.family: Family = family_of(self.config)
        self.loaded: list[str] = []  # every tensor name read through this folder, in order
        self.files = self._find_files()
        self.headers: dict[Path, tuple[dict, int]] = {f: read_safetensors_header(f) for f in self.files}
        self.where: dict[str, Path] = {}
        for f, (header, _) in self.headers.items():
            for name in header:
                if name != "__metadata__" and not ignored(name):
                    self.where[name] = f

    def _find_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{index}: bad index: {e}") from None
            files = sorted({self.path / Path(v).name for v in wm.values()})
        elif (self.path / "model.safetensors").exists():
            files = [self.path / "model.safetensors"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{self.path} has no .safetensors weights")
        missing = [f for f in files if not f.exists()]
        if missing:
            raise WeightsError(f"{self.path}: missing weight files {[m.name for m in missing]}")
        return files

    def tensor_info(self, name: str) -> tuple[Path, dict, int]:
        """(file, header entry {dtype, shape, data_offsets}, data start) of one tensor."""
        f = self.where[name]
        header, start = self.headers[f]
        return f, header[name], start

    def block_tensor_names(self, i: int) -> list[str]:
        """All checkpoint tensors under block i's prefix (what identity hashes)."""
        prefix = self.family.block_prefix(i)
        return sorted(n for n in self.where if n.startswith(prefix))

    def head_tensor_names(self) -> list[str]:
        return sorted(n for n in self.where if self.family.block_of(n) is None)

    def read(self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
        """Read just these tensors (file by file, tensor by tensor) into dtype on device."""
        names = list(names)
        lacking = [n for n in names if n not in self.where]
        if lacking:
            raise WeightsError(f"{self.path}: checkpoint lacks {lacking[:5]}{' ...' if len(lacking) > 5 else ''}")
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            header, data_start = self.headers[f]
            with open(f, "rb", buffering=0) as fh:
                for n in ns:
                    t = _read_tensor(fh, f, n, header[n], data_start)
                    out[n] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
                    self.loaded.append(n)
        return out

    def check_shapes(self, parts: dict[str, str]) -> None:
        """Every tensor's stored shape is what the config implies (before reading any bytes)."""
        want = self.family.shapes(self.config)
        for short, name in parts.items():
            if name not in self.where:
                raise WeightsError(f"{self.path}: checkpoint lacks {name}")
            got = tuple(self.tensor_info(name)[1].get("shape", ()))
            if got != want[short]:
                raise WeightsError(f"{self.path}: {name} has shape {list(got)}, config.json implies {list(want[short])}")

    def read_concat(self, names: list[str], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Tensors with equal trailing dims read straight into one tensor concatenated on dim 0.

        Used for fused q/k/v and gate/up weights: no unfused copy is ever allocated (CPU).
        """
        infos = []
        for n in names:
            if n not in self.where:
                raise WeightsError(f"{self.path}: checkpoint lacks {n}")
            f, info, start = self.tensor_info(n)
            infos.append((n, f, info, start))
        shapes = [list(i[2].get("shape", [])) for i in infos]
        if not shapes[0] or any(len(sh) != len(shapes[0]) or sh[1:] != shapes[0][1:] for sh in shapes):
            raise WeightsError(f"{self.path}: cannot stack {names}: shapes {shapes}")
        out = torch.empty([sum(sh[0] for sh in shapes), *shapes[0][1:]], dtype=dtype)
        at = 0
        for (n, f, info, start), sh in zip(infos, shapes):
            with open(f, "rb", buffering=0) as fh:
                _read_tensor(fh, f, n, info, start, out=out[at:at + sh[0]])
            self.loaded.append(n)
            at += sh[0]
        return out.to(device)


def _read_tensor(fh, path: Path, name: str, info: dict, data_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor's byte range, read with plain file reads into memory we own.

    Not mmap (safetensors' safe_open maps the file): mapped pages that a load touches stay in
    our RSS for as long as any tensor of that file is alive, so a server would pay for the
    unfused q/k/v and gate/up copies too. A read leaves only the bytes we keep.
    """
    try:
        dtype = ST_DTYPES[info["dtype"]]
        shape = [int(d) for d in info["shape"]]
        begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: tensor {name} has a bad header entry {str(info)[:100]}") from None
    if out is not None and (out.dtype != dtype or list(out.shape) != shape or not out.is_contiguous()):
        out.copy_(_read_tensor(fh, path, name, info, data_start))  # dtype cast: through a temporary
        return out
    t = torch.empty(shape, dtype=dtype) if out is None else out
    nbytes = t.numel() * t.element_size()
    if end - begin != nbytes:
        raise WeightsError(f"{path}: tensor {name} spans {end - begin} bytes, its dtype and shape need {nbytes}")
    buf = t.view(-1).view(torch.uint8).numpy().data if nbytes else memoryview(b"")
    fh.seek(data_start + begin)
    got = 0
    while got < nbytes:
        k = fh.readinto(buf[got:])
        if not k:
            raise WeightsError(f"{path} is truncated inside tensor {name}")
        got += k
    return t


def _folder(model: str | os.PathLike | ModelFolder) -> ModelFolder:
    return model if isinstance(model, ModelFolder) else ModelFolder(model)


def load_span(model: str | os.PathLike | ModelFolder, start: int, end: int, *,
              dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> BlockSpan:
    """Blocks [start, end) of `model`, reading only their tensors."""
    mf = _folder(model)
    cfg = mf.config
    if not (0 <= start < end <= cfg.num_layers):
        raise ValueError(f"span {start}:{end} is outside the model's {cfg.num_layers} blocks")
    dt, dev = resolve_dtype(dtype), torch.device(device) if device else default_device()
    first = len(mf.loaded)
    blocks = []
    for i in range(start, end):
        parts = mf.family.block_parts(cfg, i)
        mf.check_shapes(parts)
        w: dict[str, torch.Tensor] = {}
        for fused, group in FUSED.items():
            if all(g in parts for g in group):
                w[fused] = mf.read_concat([parts.pop(g) for g in group], dtype=dt, device=dev)
        t = mf.read(parts.values(), dtype=dt, device=dev)
        w.update({short: t[name] for short, name in parts.items()})
        blocks.append(Block(cfg, i, w))
    span = BlockSpan(cfg, start, end, blocks, dtype=dt, device=dev)
    span.loaded_tensors = mf.loaded[first:]
    return span


def load_head(model: str | os.PathLike | ModelFolder, *, dtype: str | torch.dtype | None = None,
              device: str | torch.device | None = None) -> ModelHead:
    """Embeddings, final norm and LM head (the embeddings again when tied) — what a client needs."""
    mf = _folder(model)
    cfg = mf.config
    dt, dev = resolve_dtype(dtype), torch.device(device) if device else default_device()
    first = len(mf.loaded)
    parts = mf.family.head_parts(cfg)
    mf.check_shapes(parts)
    t = mf.read(parts.values(), dtype=dt, device=dev)
    head = ModelHead(cfg, t[parts["embed"]], t[parts["norm"]], t.get(parts.get("lm_head", "")), dtype=dt, device=dev)
    head.loaded_tensors = mf.loaded[first:]
    return head


def load_local_model(model: str | os.PathLike | ModelFolder, spans: list[tuple[int, int]] | None = None, *,
                     dtype: str | torch.dtype | None = None, device: str | torch.device | None = None) -> LocalModel:
    """Head + spans (default: one span of all blocks) in this process."""
    mf = _folder(model)
    spans = spans or [(0, mf.config.num_layers)]
    head = load_head(mf, dtype=dtype, device=device)
    return LocalModel(head, [load_span(mf, a, b, dtype=dtype, device=device) for a, b in spans])
