"""Model identity: one id that every peer derives from the config and the weights.

Scheme (format "potluck-model/1"), a two-level Merkle tree:

    tensor digest  = sha256("name\\0dtype\\0shape\\0" + raw little-endian bytes as stored)
    block digest i = sha256 over the sorted lines "name tensor-digest\\n" of block i's tensors
    head digest    = the same over every other tensor (embeddings, final norm, untied LM head)
    model id       = sha256(canonical JSON {format, config: ModelConfig.canonical(), head, blocks})

- Bytes are hashed as stored in the safetensors file (never after a dtype cast), and the id does
  not depend on how the checkpoint is sharded or ordered: two folders with the same tensors agree.
  A bfloat16 copy of a float32 model is a different model, on purpose (different numbers).
- The config part is our normalised `ModelConfig` (what the math uses), so bookkeeping fields
  (transformers_version, dtype spelling, token ids) do not split the swarm.
- The manifest (the id's preimage plus per-tensor digests) is small (a few KB per block): a peer
  can publish it; a server that holds only blocks [a, b) checks `manifest_id(manifest)` equals
  the announced model id, then hashes just its own blocks (`verify_blocks`) — cost proportional
  to what it serves, not to the model. A peer with the whole folder builds the manifest once
  (`build_manifest`, ~1 s per 500 MB); it is cached next to the weights, keyed by file sizes and
  mtimes, so later starts only re-read the headers.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os

from .loading import ModelFolder

FORMAT = "potluck-model/1"
CACHE_FILE = ".potluck-manifest.json"
CHUNK = 8 * 1024 * 1024


class ModelMismatch(ValueError):
    """Local weights do not match a model id / manifest."""


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def tensor_digest(mf: ModelFolder, name: str) -> str:
    f, info, data_start = mf.tensor_info(name)
    begin, end = info["data_offsets"]
    h = hashlib.sha256(f"{name}\0{info['dtype']}\0{list(info['shape'])}\0".encode())
    with open(f, "rb") as fh:
        if end > begin:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                mv = memoryview(mm)
                try:
                    for off in range(data_start + begin, data_start + end, CHUNK):
                        h.update(mv[off:min(off + CHUNK, data_start + end)])
                finally:
                    mv.release()
    return h.hexdigest()


def group_digest(tensor_digests: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{n} {d}\n" for n, d in sorted(tensor_digests.items())).encode()).hexdigest()


def manifest_id(manifest: dict) -> str:
    """The model id a manifest stands for (recomputed, so a forged manifest does not pass)."""
    return hashlib.sha256(_canonical({k: manifest[k] for k in ("format", "config", "head", "blocks")})).hexdigest()


def _folder_key(mf: ModelFolder) -> list:
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in mf.files) + [
        (mf.path / "config.json").stat().st_mtime_ns]


def build_manifest(model: str | os.PathLike | ModelFolder, *, cache: bool = True) -> dict:
    """Hash every tensor of a full local folder into a manifest (cached in the folder when writable)."""
    mf = model if isinstance(model, ModelFolder) else ModelFolder(model)
    key = _folder_key(mf)
    cache_path = mf.path / CACHE_FILE
    if cache and cache_path.exists():
        try:
            cached = json.loads(cache_path.read_text())
            if cached.get("key") == key and manifest_id(cached["manifest"]) == cached["manifest"]["model_id"]:
                return cached["manifest"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    cfg = mf.config
    blocks_t = [{n: tensor_digest(mf, n) for n in mf.block_tensor_names(i)} for i in range(cfg.num_layers)]
    if not all(blocks_t):
        raise ModelMismatch(f"{mf.path}: some blocks have no tensors")
    head_t = {n: tensor_digest(mf, n) for n in mf.head_tensor_names()}
    stray = [n for n in mf.where if (mf.family.block_of(n) or 0) >= cfg.num_layers]
    if stray:
        raise ModelMismatch(f"{mf.path}: tensors of blocks past the config's {cfg.num_layers}: {stray[:3]}")
    manifest = {
        "format": FORMAT,
        "config": cfg.canonical(),
        "head": group_digest(head_t),
        "blocks": [group_digest(b) for b in blocks_t],
        "tensors": {"head": head_t, "blocks": blocks_t},
    }
    manifest["model_id"] = manifest_id(manifest)
    if cache:
        try:
            tmp = cache_path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "manifest": manifest}))
            os.replace(tmp, cache_path)
        except OSError:
            pass  # read-only model folder: fine, just slower next time
    return manifest


def model_id(model: str | os.PathLike | ModelFolder, *, cache: bool = True) -> str:
    """Hex sha256 id of the model in this folder (config + all weights)."""
    return build_manifest(model, cache=cache)["model_id"]


def short_id(mid: str) -> str:
    return mid[:16]


def verify_blocks(model: str | os.PathLike | ModelFolder, manifest: dict, start: int, end: int,
                  *, expected_id: str | None = None) -> None:
    """Check blocks [start, end) of the local folder (and its config) against a manifest of another peer.

    Hashes only those blocks. Raises ModelMismatch naming the first differing block/tensor.
    """
    mf = model if isinstance(model, ModelFolder) else ModelFolder(model)
    mid = manifest_id(manifest)
    if manifest.get("model_id") not in (None, mid) or (expected_id is not None and expected_id != mid):
        raise ModelMismatch("manifest does not hash to the announced model id")
    if mf.config.canonical() != manifest["config"]:
        raise ModelMismatch(f"{mf.path}: config differs from model {short_id(mid)}")
    if not (0 <= start < end <= len(manifest["blocks"])):
        raise ModelMismatch(f"span {start}:{end} is outside the model's {len(manifest['blocks'])} blocks")
    for i in range(start, end):
        got = {n: tensor_digest(mf, n) for n in mf.block_tensor_names(i)}
        if group_digest(got) != manifest["blocks"][i]:
            want = (manifest.get("tensors") or {}).get("blocks", [{}] * (i + 1))[i]
            bad = sorted(n for n in set(got) | set(want) if got.get(n) != want.get(n))
            raise ModelMismatch(f"{mf.path}: block {i} differs from model {short_id(mid)}"
                                + (f" (tensors {bad[:3]})" if bad else ""))


def verify_head(model: str | os.PathLike | ModelFolder, manifest: dict) -> None:
    """The client-side counterpart of verify_blocks: embeddings / final norm / LM head."""
    mf = model if isinstance(model, ModelFolder) else ModelFolder(model)
    if mf.config.canonical() != manifest["config"]:
        raise ModelMismatch(f"{mf.path}: config differs from model {short_id(manifest_id(manifest))}")
    got = {n: tensor_digest(mf, n) for n in mf.head_tensor_names()}
    if group_digest(got) != manifest["head"]:
        raise ModelMismatch(f"{mf.path}: embeddings / norm / LM head differ from model {short_id(manifest_id(manifest))}")
