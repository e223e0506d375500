"""CognicaConfig: nanochat and HF field names, one clear error per bad field, and the derived per-layer facts."""

import json
from pathlib import Path

import pytest

from cognica.config import CognicaConfig, ConfigError

NANOCHAT = {"n_layer": 24, "n_head": 12, "n_kv_head": 12, "n_embd": 1536, "vocab_size": 32768, "sequence_len": 2048,
            "window_pattern": "SSSL"}
HF = {"num_hidden_layers": 24, "num_attention_heads": 12, "num_key_value_heads": 12, "hidden_size": 1536,
      "vocab_size": 32768, "max_position_embeddings": 2048, "window_pattern": "SSSL"}


def parse_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        CognicaConfig.from_dict(raw)
    return str(e.value)


def test_nanochat_and_hf_names_give_the_same_config():
    assert CognicaConfig.from_dict(NANOCHAT) == CognicaConfig.from_dict(HF) == CognicaConfig(), (
        "nanochat and HF spellings of the release config must parse to the same (default) config"
    )


def test_both_spellings_present_and_equal_is_accepted():
    cfg = CognicaConfig.from_dict(NANOCHAT | HF)
    assert cfg == CognicaConfig(), "a config.json carrying both spellings with equal values must parse"


@pytest.mark.parametrize("field, alias", [
    ("n_layer", "num_hidden_layers"), ("n_embd", "hidden_size"), ("n_head", "num_attention_heads"),
    ("sequence_len", "max_position_embeddings"),
])
def test_conflicting_spellings_name_the_field(field, alias):
    msg = parse_error(NANOCHAT | {alias: NANOCHAT[field] * 2})
    assert field in msg and "conflicting" in msg, f"a {field}/{alias} conflict must be reported by name: {msg}"


def test_missing_n_kv_head_defaults_to_mha():
    raw = {k: v for k, v in NANOCHAT.items() if k != "n_kv_head"}
    assert CognicaConfig.from_dict(raw).n_kv_head == 12, "without n_kv_head the model is MHA (n_kv_head = n_head)"


@pytest.mark.parametrize("field", ["n_layer", "n_head", "n_embd", "vocab_size", "sequence_len"])
def test_missing_required_field_is_named(field):
    msg = parse_error({k: v for k, v in NANOCHAT.items() if k != field})
    assert f"{field}: missing" in msg, f"the missing field {field} must be named: {msg}"


def test_heads_not_dividing_width_is_an_error():
    msg = parse_error(NANOCHAT | {"n_embd": 1000})
    assert "n_embd/n_head" in msg and "not divisible" in msg, f"1000 / 12 heads must be refused by name: {msg}"


def test_kv_heads_not_dividing_query_heads_is_an_error():
    msg = parse_error(NANOCHAT | {"n_kv_head": 5})
    assert "n_kv_head" in msg, f"5 KV heads for 12 query heads must be refused by name: {msg}"


def test_unknown_window_letter_is_an_error():
    msg = parse_error(NANOCHAT | {"window_pattern": "SSXL"})
    assert "window_pattern" in msg and "'X'" in msg, f"the unknown letter X must be named: {msg}"


@pytest.mark.parametrize("n_layer, pattern, letters", [(2, "SSSL", "SL"), (3, "SSSL", "SSL"), (1, "SSSL", "L"),
                                                      (6, "SSSL", "SSSLSL"), (5, "L", "LLLLL"), (3, "SLSSL", "SLL")])
def test_window_pattern_is_tiled_over_the_layers_whatever_its_length(n_layer, pattern, letters):
    """Upstream nanochat's `_compute_window_sizes`: layer i takes pattern[i % len(pattern)], the last layer L; a small
    model with the default "SSSL" (shorter than the pattern) is valid there, so here too."""
    cfg = CognicaConfig.from_dict(NANOCHAT | {"n_layer": n_layer, "window_pattern": pattern})
    assert cfg.window_letters == letters
    assert cfg.is_sliding == tuple(c == "S" for c in letters)


@pytest.mark.parametrize("value", ["24", 24.5, True, [24], None])
def test_non_integer_layer_count_is_an_error(value):
    msg = parse_error(NANOCHAT | {"n_layer": value})
    assert "n_layer" in msg, f"n_layer={value!r} must be refused by name: {msg}"


def test_integral_float_is_accepted_as_int():
    cfg = CognicaConfig.from_dict(NANOCHAT | {"n_layer": 24.0})
    assert cfg.n_layer == 24 and isinstance(cfg.n_layer, int), "24.0 (as some JSON writers emit) means 24"


def test_bad_poe_mode_is_an_error():
    msg = parse_error(NANOCHAT | {"poe_mode": "tree"})
    assert "poe_mode" in msg and "'tree'" in msg, f"an unknown poe_mode must be refused by name: {msg}"


def test_head_dim_field_contradicting_the_shape_is_an_error():
    msg = parse_error(NANOCHAT | {"head_dim": 64})
    assert "head_dim" in msg, f"head_dim 64 with 1536/12 = 128 must be refused: {msg}"


def test_several_problems_are_all_listed():
    msg = parse_error({"n_layer": 24})
    for field in ("n_head", "n_embd", "vocab_size", "sequence_len"):
        assert field in msg, f"every missing field must be in one message, {field} is not: {msg}"


def test_release_windows_are_512_then_2048_every_fourth_layer():
    cfg = CognicaConfig()
    assert cfg.window_left == (512, 512, 512, 2048) * 6, f"release windows wrong: {cfg.window_left}"
    assert cfg.window_letters[-1] == "L", "the last layer is always L"
    assert cfg.window_keys == tuple(w + 1 for w in cfg.window_left), "vLLM units count the query too"


def test_last_layer_is_forced_long():
    cfg = CognicaConfig(n_layer=6, window_pattern="S")
    assert cfg.window_letters == "SSSSSL", f"the last layer must be L even with pattern 'S': {cfg.window_letters}"


def test_release_value_embedding_layers_are_the_odd_ones():
    assert CognicaConfig().ve_layers == tuple(range(1, 24, 2)), "value embeddings live on layers 1, 3, ..., 23"


def test_release_backout_layer_is_12():
    assert CognicaConfig().backout_layer == 12, "backout reads the residual after block n_layer // 2 = 12"


def test_short_window_is_128_at_sequence_len_256():
    cfg = CognicaConfig(n_layer=4, sequence_len=256)
    assert cfg.short_window == 128, f"ceil(ceil(256/4)/128)*128 = 128, got {cfg.short_window}"
    assert cfg.window_left == (128, 128, 128, 256), f"windows at sequence_len 256: {cfg.window_left}"


def test_unknown_fields_are_kept_in_extra():
    cfg = CognicaConfig.from_dict(NANOCHAT | {"poe_stage_weights": [1, 2], "architectures": ["X"]})
    assert cfg.extra == {"poe_stage_weights": [1, 2]}, f"unknown fields kept, known HF ones not: {cfg.extra}"


def test_from_file_reports_invalid_json(tmp_path: Path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CognicaConfig.from_file(tmp_path / "config.json")


def test_to_dict_round_trips():
    cfg = CognicaConfig(n_layer=8, n_head=4, n_kv_head=2, n_embd=256, sequence_len=512, window_pattern="SL")
    assert CognicaConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, "to_dict must parse back"


def test_autoconfig_loads_factory_dir_without_remote_code(published_ckpt: Path):
    from transformers import AutoConfig

    from cognica.hf import CognicaPoEConfig, register

    register()
    hf = AutoConfig.from_pretrained(published_ckpt)
    assert isinstance(hf, CognicaPoEConfig), f"AutoConfig gave {type(hf).__name__}"
    assert (hf.n_layer, hf.num_hidden_layers, hf.head_dim) == (4, 4, 64), "tiny preset fields through transformers"
    assert hf.to_cognica() == CognicaConfig.from_file(published_ckpt / "config.json"), "HF config round trip"
