"""The weight front end both plugins load through (`cognica.weights`): names, dropped tensors, one error."""

from dataclasses import replace

import pytest
import torch

from cognica.config import CognicaConfig
from cognica.names import CheckpointError, expected_tensors
from cognica.weights import engine_name, engine_weights, load_parameters, stacked_shard

CFG = CognicaConfig.from_dict({"n_layer": 4, "n_embd": 64, "n_head": 2, "n_kv_head": 1, "vocab_size": 64,
                               "sequence_len": 64, "window_pattern": "SSSL"})


def stored(cfg: CognicaConfig, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    return [(prefix + n, torch.zeros(shape)) for n, shape in expected_tensors(cfg).items()]


def test_names_follow_the_one_table():
    assert engine_name("transformer.wte.weight") == "model.wte.weight"
    assert engine_name("transformer.h.3.attn.c_q.weight") == "model.layers.3.attn.c_q.weight"
    assert engine_name("transformer.h.3.attn.ve_gate.weight") == "model.layers.3.attn.ve_gate"
    assert engine_name("smear_gate.weight") == "model.smear_gate"
    assert engine_name("value_embeds.1.weight") == "model.value_embeds.1.weight"
    assert engine_name("resid_lambdas") == "model.resid_lambdas"
    assert engine_name("lm_head.weight") == "lm_head.weight"
    assert stacked_shard("model.layers.0.attn.c_k.weight") == ("model.layers.0.attn.qkv_proj.weight", "k")
    assert stacked_shard("model.layers.0.mlp.c_proj.weight") == ("model.layers.0.mlp.c_proj.weight", None)


def test_every_tensor_of_a_full_checkpoint_comes_out_once_wrapper_prefix_and_rotary_buffers_dropped():
    weights = stored(CFG, prefix="_orig_mod.") + [("cos", torch.zeros(1)), ("transformer.sin", torch.zeros(1))]
    names = [n for n, _ in engine_weights(CFG, weights)]
    assert sorted(names) == sorted(engine_name(n) for n in expected_tensors(CFG))


def test_a_stage_prefix_drops_the_later_layers_but_still_needs_a_complete_checkpoint():
    prefix = replace(CFG, poe_every=2, poe_exit_stage=1, poe_force=True)
    names = [n for n, _ in engine_weights(prefix, stored(CFG))]
    assert not [n for n in names if n.startswith(("model.layers.2.", "model.layers.3.", "model.value_embeds.3"))]
    assert "model.layers.1.attn.c_q.weight" in names and "lm_head.weight" in names
    incomplete = [(n, t) for n, t in stored(CFG) if not n.startswith("transformer.h.3.")]
    with pytest.raises(CheckpointError, match=r"missing \d+ tensor\(s\): transformer\.h\.3\."):
        list(engine_weights(prefix, incomplete))


def test_unknown_and_missing_tensors_are_one_checkpoint_error():
    weights = [w for w in stored(CFG) if w[0] != "x0_lambdas"] + [("transformer.h.0.attn.c_q.bias", torch.zeros(1))]
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): x0_lambdas; unexpected tensor\(s\) not in "
                                              r"the architecture: transformer\.h\.0\.attn\.c_q\.bias"):
        list(engine_weights(CFG, weights))


def test_quantization_extras_follow_their_layer_weight():
    qc = {"quant_method": "compressed-tensors", "format": "int-quantized", "ignore": ["lm_head", "re:.*ve_gate$",
          "re:.*smear_gate$"], "config_groups": {"g": {"targets": ["Linear"], "input_activations": None,
          "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}}}}
    scale = [("transformer.h.0.attn.c_k.weight_scale", torch.ones(32, 1))]
    others = [(f"transformer.h.{i}.{m}.weight_scale", torch.ones(1)) for i in range(4)
              for m in ("attn.c_q", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    others += [(f"transformer.h.{i}.attn.c_k.weight_scale", torch.ones(1)) for i in range(1, 4)]
    names = [n for n, _ in engine_weights(CFG, stored(CFG) + scale + others, qc)]
    assert "model.layers.0.attn.c_k.weight_scale" in names
    assert stacked_shard("model.layers.0.attn.c_k.weight_scale") == ("model.layers.0.attn.qkv_proj.weight_scale",
                                                                      "k")


class Param(torch.nn.Parameter):
    pass


def test_load_parameters_uses_the_shard_loader_and_refuses_a_scale_without_a_parameter():
    calls = []
    qkv = Param(torch.zeros(4))
    qkv.weight_loader = lambda p, t, shard: calls.append(("qkv", shard))
    plain = torch.nn.Parameter(torch.zeros(2))
    params = {"model.layers.0.attn.qkv_proj.weight": qkv, "model.resid_lambdas": plain}
    loaded = load_parameters(params, [("model.layers.0.attn.c_v.weight", torch.ones(4)),
                                      ("model.resid_lambdas", torch.ones(2)),
                                      ("model.layers.9.mlp.c_fc.weight", torch.ones(1))],
                             lambda p, t: p.data.copy_(t), absent=lambda n: n.startswith("model.layers.9"))
    assert calls == [("qkv", "v")] and plain.tolist() == [1.0, 1.0]
    assert loaded == {"model.layers.0.attn.qkv_proj.weight", "model.resid_lambdas"}
    with pytest.raises(CheckpointError, match="built no parameter"):
        load_parameters(params, [("model.layers.0.mlp.c_fc.weight_scale", torch.ones(1))], lambda p, t: None)
