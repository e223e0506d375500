"""Adapters and quantized checkpoints the engine tests write themselves, in the formats users bring (engine-free).

LoRA: the PEFT file format (adapter_config.json + adapter_model.safetensors, tensors named
`base_model.model.<nanochat module path>.lora_A.weight` / `lora_B.weight`, `lora_embedding_A` / `lora_embedding_B`
for an embedding), with PEFT's merge W + (alpha / r) * B @ A as the oracle. W8A8: compressed-tensors int8 as
llm-compressor's W8A8 scheme saves it (int8 weight per output channel + bf16 weight_scale [out, 1]).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cognica.model import CognicaGPT

PROJECTIONS = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def write_adapter(out: Path, ref: CognicaGPT, targets: list[str], r: int, alpha: float, seed: int,
                  zero_b: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT LoRA adapter on the reference's modules `targets` (nanochat paths): A ~ U(-1/sqrt(in), ..), B scaled
    so each delta moves its layer's output visibly (or B = 0). Returns {path: (A, B)} as PEFT stores them
    (Linear: A [r, in], B [out, r]; Embedding: A [r, vocab], B [dim, r])."""
    g = torch.Generator().manual_seed(seed)
    tensors, pairs = {}, {}
    for path in targets:
        module = ref.get_submodule(path)
        if isinstance(module, torch.nn.Embedding):
            n_in, n_out = module.num_embeddings, module.embedding_dim
            suffixes = ("lora_embedding_A", "lora_embedding_B")
        else:
            n_in, n_out, suffixes = module.in_features, module.out_features, ("lora_A.weight", "lora_B.weight")
        a = (torch.rand(r, n_in, generator=g) * 2 - 1) / n_in**0.5
        b = torch.zeros(n_out, r) if zero_b else (torch.rand(n_out, r, generator=g) * 2 - 1) * 0.3
        pairs[path] = (a, b)
        tensors[f"base_model.model.{path}.{suffixes[0]}"] = a.contiguous()
        tensors[f"base_model.model.{path}.{suffixes[1]}"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "modules_to_save": None, "base_model_name_or_path": None,
              "target_modules": sorted({p.rsplit(".", 1)[-1] for p in targets})}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return pairs


@torch.no_grad()
def merged(ref: CognicaGPT, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float) -> CognicaGPT:
    """The reference with each adapted weight replaced by PEFT's merge, W + (alpha / r) * B @ A (an embedding's
    table [vocab, dim] gets (B @ A).T)."""
    out = copy.deepcopy(ref)
    for path, (a, b) in pairs.items():
        module = out.get_submodule(path)
        delta = (alpha / r) * (b @ a)
        module.weight += delta.T if isinstance(module, torch.nn.Embedding) else delta
    return out


def all_projections(n_layer: int) -> list[str]:
    return [f"transformer.h.{i}.{p}" for i in range(n_layer) for p in PROJECTIONS]


W8A8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                    "group_size": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True, "group_size": None, "observer": None},
        "output_activations": None,
    }},
    "ignore": ["lm_head", "re:.*ve_gate$", "re:.*smear_gate$"],
    "kv_cache_scheme": None,
}


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel, as compressed-tensors' minmax observer: (q int8, scale bf16 [out, 1], the
    scale stored in the model's dtype); q * scale is the dequantized weight."""
    scale = (w.float().abs().amax(dim=1, keepdim=True) / 127).to(torch.bfloat16)
    return torch.round(w.float() / scale.float()).clamp(-128, 127).to(torch.int8), scale


def write_adapter_set(root: Path, ref: CognicaGPT, rank: int) -> dict[str, tuple[str, CognicaGPT]]:
    """The adapters both engines' LoRA tests serve, name -> (directory, merged reference): zero-B on every
    projection; every projection of every layer; another rank on a few projections (layer 1: c_k alone, the other
    parts of its QKV zero); the input embedding and the head."""
    n = ref.config.n_layer
    specs = {
        "zero": (all_projections(n), rank, 16.0, True),
        "all": (all_projections(n), rank, 16.0, False),
        "some": ([f"transformer.h.{i}.{p}" for i in (0, 3) for p in ("attn.c_q", "attn.c_v", "mlp.c_fc")]
                 + ["transformer.h.1.attn.c_k", "transformer.h.2.attn.c_proj", "transformer.h.1.mlp.c_proj"],
                 4, 12.0, False),
        "vocab": (["transformer.wte", "lm_head"], rank, 8.0, False),
    }
    out = {}
    for i, (name, (targets, r, alpha, zero_b)) in enumerate(specs.items(), start=1):
        pairs = write_adapter(root / name, ref, targets, r, alpha, seed=i, zero_b=zero_b)
        out[name] = (str(root / name), merged(ref, pairs, r, alpha))
    return out


@torch.no_grad()
def write_llama_w8a8(out: Path) -> Any:
    """The in-tree control: a tiny transformers LlamaForCausalLM (4 layers x 128) saved at `out` with every *_proj
    quantized as above (lm_head ignored); returns the model, its weights set to the dequantized ones (the oracle)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         initializer_range=0.05, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    quant = {}
    for name, t in model.state_dict().items():
        if name.endswith("proj.weight"):
            q, scale = quantize_per_channel(t)
            quant[name], quant[name.removesuffix("weight") + "weight_scale"] = q, scale
            t.copy_(q.float() * scale.float())
        else:
            quant[name] = t.contiguous()
    save_file(quant, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": dict(W8A8_CONFIG, ignore=["lm_head"])}))
    return model
