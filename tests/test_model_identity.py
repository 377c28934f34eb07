"""Model ids: stable across loads and shardings, different when one weight changes; per-span verification."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.identity import ModelMismatch, build_manifest, manifest_id, model_id, verify_blocks, verify_head
from testkit.models import make_tiny


@pytest.fixture(scope="module")
def tiny(llama_folder):
    return llama_folder


def test_id_is_stable_and_independent_of_sharding_and_bookkeeping(tiny, tmp_path):
    a = model_id(tiny, cache=False)
    assert a == model_id(tiny, cache=False) == model_id(tiny)  # second via the cache file
    assert model_id(tiny) == a  # cache hit
    assert len(a) == 64 and int(a, 16) >= 0
    # the same tensors split over shards, with a config that differs only in bookkeeping
    sharded = tmp_path / "sharded"
    make_tiny("llama", sharded, shard=True)
    cfg = json.loads((sharded / "config.json").read_text())
    cfg["transformers_version"] = "4.0.0"
    (sharded / "config.json").write_text(json.dumps(cfg))
    assert model_id(sharded, cache=False) == a


def test_one_changed_weight_changes_the_id_and_is_located(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    sd = load_file(other / "model.safetensors")
    sd["model.layers.2.mlp.down_proj.weight"][0, 0] += 1e-3
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    assert model_id(other, cache=False) != model_id(tiny, cache=False)
    theirs = build_manifest(tiny, cache=False)
    verify_blocks(other, theirs, 0, 2)  # blocks 0-1 are the same
    verify_blocks(other, theirs, 3, 4)
    verify_head(other, theirs)
    with pytest.raises(ModelMismatch, match=r"block 2 differs.*down_proj"):
        verify_blocks(other, theirs, 1, 3)


def test_config_change_and_forged_manifest(tiny, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    assert model_id(other, cache=False) != model_id(tiny, cache=False)
    m = build_manifest(tiny, cache=False)
    with pytest.raises(ModelMismatch, match="config differs"):
        verify_blocks(other, m, 0, 1)
    forged = dict(m, blocks=list(m["blocks"]))
    forged["blocks"][0] = "0" * 64
    with pytest.raises(ModelMismatch, match="does not hash"):
        verify_blocks(tiny, forged, 0, 1)
    assert manifest_id(m) == m["model_id"]


def test_dtype_copy_is_another_model(tiny, tmp_path):
    other = tmp_path / "bf16"
    shutil.copytree(tiny, other)
    sd = {k: v.to(torch.bfloat16) for k, v in load_file(other / "model.safetensors").items()}
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    assert model_id(other, cache=False) != model_id(tiny, cache=False)
