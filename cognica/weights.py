"""The weight front end both engine plugins load through: checkpoint tensors -> engine parameter names.

A checkpoint stores nanochat's names (`transformer.h.3.attn.c_q.weight`, maybe under a wrapper prefix such as
`model.` or `_orig_mod.`); both plugins build the same module tree (`CognicaModel` under `model`, `lm_head` beside
it), so one table serves both:

    transformer.wte.weight            -> model.wte.weight
    transformer.h.{i}.attn.c_q.weight -> model.layers.{i}.attn.qkv_proj.weight, shard "q" (c_k: "k", c_v: "v")
    transformer.h.{i}.attn.ve_gate.weight -> model.layers.{i}.attn.ve_gate (a plain parameter)
    value_embeds.{i}.weight           -> model.value_embeds.{i}.weight
    smear_gate.weight                 -> model.smear_gate (a plain parameter); the other scalars model.<name>
    lm_head.weight                    -> lm_head.weight

`engine_weights` drops what the engine does not build (layers past a stage prefix's exit) and what may be ignored
(rotary buffers), refuses any other tensor the architecture does not have, and at the end refuses a checkpoint that
lacked an expected tensor, all with one `CheckpointError`. A pre-quantized checkpoint's extra tensors
(`cognica.quantization`: `weight_scale`, ...) follow their layer's weight. `load_parameters` then hands each
tensor to the engine parameter's own `weight_loader` (shard id for the fused QKV), as both engines' in-tree models do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch

from cognica.config import CognicaConfig
from cognica.names import IGNORABLE, CheckpointError, canonical_name, expected_tensors, mismatch_problems
from cognica.quantization import quantization_layout

# (fused parameter, nanochat projection, shard id): the QKV fusion both engines do (QKVParallelLinear)
STACKED_PARAMS = ((".qkv_proj.", ".c_q.", "q"), (".qkv_proj.", ".c_k.", "k"), (".qkv_proj.", ".c_v.", "v"))
PLAIN_PARAMETERS = ("ve_gate.weight", "smear_gate.weight")  # nn.Linear in nanochat, plain parameters here
_LAYER = re.compile(r"^transformer\.h\.(\d+)\.")

WeightLoader = Callable[..., None]
# what a LoRA adapter may reach on both engines (cognica_vllm.lora, cognica_sglang.lora)
LORA_REACH = ("LoRA reaches attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj, transformer.wte and lm_head (value embeddings, "
              "ve_gate, smear_gate and the scalars are not adaptable)")


def unadaptable(module: str) -> ValueError:
    """The one-line refusal of a LoRA adapter on a module (nanochat path) neither engine can adapt."""
    return ValueError(f"cognica: a LoRA adapter targets {module}, which this model cannot adapt; {LORA_REACH}")


def engine_name(canonical: str) -> str:
    """nanochat canonical name -> the plugins' parameter name before the QKV fusion (see the module docstring)."""
    if canonical.startswith("lm_head."):
        return canonical
    name = _LAYER.sub(r"layers.\1.", canonical).replace("transformer.wte.", "wte.", 1)
    for plain in PLAIN_PARAMETERS:
        if name.endswith(plain):
            name = name.removesuffix(".weight")
    return f"model.{name}"


def stacked_shard(name: str) -> tuple[str, str | None]:
    """An engine name -> (the parameter that holds it, its QKV shard id or None)."""
    for fused, part, shard in STACKED_PARAMS:
        if part in name:
            return name.replace(part, fused, 1), shard
    return name, None


def engine_weights(cfg: CognicaConfig, weights: Iterable[tuple[str, torch.Tensor]],
                   quantization_config: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(stored name, tensor) -> (engine name before fusion, tensor) for every tensor the engine builds; raises
    CheckpointError on a tensor the architecture (and its quantization scheme) does not have, and, once `weights`
    is exhausted, on expected tensors that never came."""
    expected = expected_tensors(cfg)
    extras = quantization_layout(cfg, quantization_config).extras
    seen: set[str] = set()
    unknown: list[str] = []
    for stored, tensor in weights:
        name = canonical_name(stored)
        if name in IGNORABLE:
            continue
        if name not in expected and name not in extras:
            unknown.append(stored)
            continue
        seen.add(name)
        if not cfg.is_built(name):
            continue  # a layer (or its value-embedding table) past a stage prefix's exit
        if name in extras:  # a scale or zero point: its layer's weight name with the scheme's suffix
            module, suffix = name.rsplit(".", 1)
            yield engine_name(f"{module}.weight").removesuffix("weight") + suffix, tensor
        else:
            yield engine_name(name), tensor
    problems = mismatch_problems([n for n in expected if n not in seen], unknown)
    if problems:
        raise CheckpointError(f"checkpoint is {'; '.join(problems)}")


def load_parameters(params: Mapping[str, torch.nn.Parameter], weights: Iterable[tuple[str, torch.Tensor]],
                    default_loader: WeightLoader,
                    absent: Callable[[str], bool] = lambda name: False) -> set[str]:
    """Load `engine_weights` output into `params` (the same names) through each parameter's
    `weight_loader` (the QKV parts with their shard id), else the engine's `default_loader`. A name for which
    `absent(name)` holds belongs to another pipeline stage and is skipped; any other name without a parameter is a
    quantization scale the engine's layer did not create (its quant config did not reach it): CheckpointError.
    Returns the names loaded."""
    loaded: set[str] = set()
    for name, tensor in weights:
        target, shard = stacked_shard(name)
        if target not in params:
            if absent(target):
                continue
            raise CheckpointError(f"{name}: the engine built no parameter for this tensor (a quantization scale "
                                  "whose layer was built without the checkpoint's quantization scheme?)")
        param = params[target]
        if shard is not None:
            param.weight_loader(param, tensor, shard)
        else:
            getattr(param, "weight_loader", default_loader)(param, tensor)
        loaded.add(target)
    return loaded
