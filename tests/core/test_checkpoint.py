"""Checkpoint layout: the name table, wrapper prefixes, shards, and one clear error per kind of bad file."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cognica.checkpoint import open_checkpoint, read_safetensors_header
from cognica.config import CognicaConfig, ConfigError
from cognica.factory import make_checkpoint
from cognica.model import load_reference
from cognica.names import CheckpointError, canonical_name, expected_tensors

SMALL = {"vocab_size": 64, "sequence_len": 64}  # tiny preset with a 64-token vocab: a ~1 MB file
IDS = torch.tensor([[1, 5, 9, 33, 2, 60, 7, 7]])


def small_ckpt(out: Path, seed: int = 0, prefix: str = "") -> Path:
    return make_checkpoint(out, preset="tiny", seed=seed, progress=False, tokenizer=False, prefix=prefix, **SMALL)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_ckpt(tmp_path_factory.mktemp("small") / "ckpt")


@pytest.fixture
def bad_dir(small_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the small checkpoint to break."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for p in small_dir.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    return out


def rewrite(ckpt: Path, change) -> None:
    tensors = load_file(ckpt / "model.safetensors")
    change(tensors)
    save_file(tensors, ckpt / "model.safetensors")


def open_error(ckpt: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(ckpt)
    return str(e.value)


@pytest.mark.parametrize("prefix", ["", "model.", "_orig_mod.", "model._orig_mod."])
@pytest.mark.parametrize("name", ["transformer.h.3.attn.c_q.weight", "value_embeds.1.weight", "smear_lambda"])
def test_canonical_name_strips_every_wrapper_prefix(prefix, name):
    assert canonical_name(prefix + name) == name, f"{prefix + name!r} must map to {name!r}"


def test_canonical_name_keeps_prefix_like_text_inside_a_name():
    assert canonical_name("transformer.h.0.model.x") == "transformer.h.0.model.x", "only leading prefixes go"


def test_prefixed_checkpoint_loads_with_identical_logits(tmp_path: Path):
    plain = load_reference(small_ckpt(tmp_path / "plain", seed=3))
    wrapped = load_reference(small_ckpt(tmp_path / "wrapped", seed=3, prefix="model._orig_mod."))
    with torch.no_grad():
        assert torch.equal(plain(IDS), wrapped(IDS)), "a model._orig_mod.-prefixed checkpoint must load identically"


def test_full_config_has_175_tensors_and_the_published_param_count():
    table = expected_tensors(CognicaConfig())
    params = sum(torch.Size(s).numel() for s in table.values())
    assert len(table) == 175, f"the release has 175 tensors, the table has {len(table)}"
    assert params == 1_384_122_122, f"the release has 1,384,122,122 params, the table gives {params:,}"
    assert CognicaConfig().num_params == params, "CognicaConfig.num_params must agree with the name table"


def test_sharded_checkpoint_with_index_loads_like_the_single_file(small_dir: Path, tmp_path: Path):
    tensors = load_file(small_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_bytes((small_dir / "config.json").read_bytes())
    for fname, part in shards.items():
        save_file({n: tensors[n] for n in part}, out / fname)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ckpt = open_checkpoint(out)
    assert len(ckpt.files) == 2, f"both shards must be used, got {ckpt.files}"
    with torch.no_grad():
        assert torch.equal(load_reference(out)(IDS), load_reference(small_dir)(IDS)), "shards must load identically"


def test_missing_tensor_is_named(bad_dir: Path):
    rewrite(bad_dir, lambda t: t.pop("transformer.h.2.mlp.c_fc.weight"))
    msg = open_error(bad_dir)
    assert "missing 1 tensor(s): transformer.h.2.mlp.c_fc.weight" in msg, msg


def test_unexpected_tensor_is_named(bad_dir: Path):
    rewrite(bad_dir, lambda t: t.update({"transformer.h.0.attn.bias": torch.zeros(4)}))
    msg = open_error(bad_dir)
    assert "unexpected tensor(s)" in msg and "transformer.h.0.attn.bias" in msg, msg


def test_wrong_shape_gives_expected_and_found(bad_dir: Path):
    rewrite(bad_dir, lambda t: t.update({"transformer.h.1.attn.c_k.weight": torch.zeros(64, 128)}))
    msg = open_error(bad_dir)
    assert "'transformer.h.1.attn.c_k.weight': expected shape [128, 128], found [64, 128]" in msg, msg


def test_integer_dtype_is_refused(bad_dir: Path):
    rewrite(bad_dir, lambda t: t.update({"resid_lambdas": torch.ones(4, dtype=torch.int32)}))
    msg = open_error(bad_dir)
    assert "'resid_lambdas': expected a float dtype" in msg and "I32" in msg, msg


def test_tensor_stored_under_two_prefixes_is_refused(bad_dir: Path):
    rewrite(bad_dir, lambda t: t.update({"model.smear_lambda": t["smear_lambda"].clone()}))
    assert "stored twice" in open_error(bad_dir)


def test_nan_scalar_is_refused(bad_dir: Path):
    rewrite(bad_dir, lambda t: t["backout_lambda"].fill_(float("nan")))
    msg = open_error(bad_dir)
    assert "'backout_lambda'" in msg and "NaN/Inf" in msg, msg


def test_truncated_file_says_truncated(bad_dir: Path):
    path = bad_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    assert "truncated" in open_error(bad_dir)


def test_header_length_beyond_the_file_says_truncated(bad_dir: Path):
    path = bad_dir / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    assert "truncated or corrupt" in open_error(bad_dir)


def test_header_lying_about_a_tensor_size_is_refused(tmp_path: Path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="header lies about tensor 'x'"):
        read_safetensors_header(tmp_path / "a.safetensors")


def test_overlapping_offsets_are_refused(tmp_path: Path):
    header = json.dumps({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors_header(tmp_path / "a.safetensors")


def test_empty_file_is_refused(bad_dir: Path):
    (bad_dir / "model.safetensors").write_bytes(b"")
    assert "empty file" in open_error(bad_dir)


def test_header_that_is_not_json_is_refused(bad_dir: Path):
    (bad_dir / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"{{{{" + bytes(8))
    assert "not JSON" in open_error(bad_dir)


def test_both_layouts_present_is_refused(bad_dir: Path):
    save_file({"smear_lambda": torch.zeros(1)}, bad_dir / "model-00001-of-00001.safetensors")
    assert "keep one layout" in open_error(bad_dir)


def test_shards_without_index_are_refused(bad_dir: Path):
    os.rename(bad_dir / "model.safetensors", bad_dir / "model-00001-of-00001.safetensors")
    assert "without model.safetensors.index.json" in open_error(bad_dir)


def test_index_naming_a_missing_shard_is_refused(bad_dir: Path):
    os.remove(bad_dir / "model.safetensors")
    (bad_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    assert "'gone.safetensors', which is missing" in open_error(bad_dir)


def test_no_weights_at_all_is_refused(bad_dir: Path):
    os.remove(bad_dir / "model.safetensors")
    assert "no model.safetensors" in open_error(bad_dir)


def test_symlink_out_of_the_directory_is_refused(bad_dir: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere.safetensors"
    os.rename(bad_dir / "model.safetensors", outside)
    (bad_dir / "model.safetensors").symlink_to(Path("..") / outside.name)
    assert "symlink points outside" in open_error(bad_dir)


def test_bad_config_raises_config_error(bad_dir: Path):
    (bad_dir / "config.json").write_text(json.dumps({"n_layer": 4}))
    with pytest.raises(ConfigError, match="n_embd: missing"):
        open_checkpoint(bad_dir)
