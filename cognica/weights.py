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

WeightLoader = Callable[..., None]
# published prefix -> the plugins' prefix: both build nanochat's tree under `model` (`layers` for `transformer.h`,
# `wte` for `transformer.wte`) with lm_head beside it; any other name (the scalars) goes under `model.` as it is
ENGINE_PREFIXES = {"transformer.h.": "model.layers.", "transformer.wte.": "model.wte.",
                   "value_embeds.": "model.value_embeds.", "lm_head.": "lm_head."}
# The one table of what a LoRA adapter may reach on both engines (cognica_vllm.lora, cognica_sglang.lora derive their
# names from it): published module paths, `{i}` a layer. The engines wrap linear layers and the two vocab tables;
# value embeddings, ve_gate, smear_gate and the scalars are plain tables or parameters they never wrap.
LORA_LAYER_MODULES = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
LORA_MODULES = (*(f"transformer.h.{{i}}.{m}" for m in LORA_LAYER_MODULES), "transformer.wte", "lm_head")
LORA_NOT_ADAPTABLE = ("value embeddings", "ve_gate", "smear_gate", "the scalars")


def _reach_prose() -> str:
    """`LORA_REACH`: the table in one line, per-layer modules grouped by parent (`attn.c_q/c_k`)."""
    parents: dict[str, list[str]] = {}
    for m in LORA_LAYER_MODULES:
        parent, leaf = m.split(".")
        parents.setdefault(parent, []).append(leaf)
    grouped = [f"{parent}.{'/'.join(leaves)}" for parent, leaves in parents.items()]
    others = [m for m in LORA_MODULES if "{i}" not in m]
    return (f"LoRA reaches {', '.join(grouped + others[:-1])} and {others[-1]} "
            f"({', '.join(LORA_NOT_ADAPTABLE[:-1])} and {LORA_NOT_ADAPTABLE[-1]} are not adaptable)")


LORA_REACH = _reach_prose()


def unadaptable(module: str) -> ValueError:
    """The one-line refusal of a LoRA adapter on a module (nanochat path) neither engine can adapt."""
    return ValueError(f"cognica: a LoRA adapter targets {module}, which this model cannot adapt; {LORA_REACH}")


def engine_name(canonical: str) -> str:
    """nanochat canonical name -> the plugins' parameter name before the QKV fusion (see the module docstring)."""
    prefix = next((p for p in ENGINE_PREFIXES if canonical.startswith(p)), None)
    if prefix is None:
        name = f"model.{canonical}"
    else:
        name = ENGINE_PREFIXES[prefix] + canonical[len(prefix):]
    for plain in PLAIN_PARAMETERS:
        if name.endswith(plain):
            name = name.removesuffix(".weight")
    return name


def lora_module_pattern(rename: Callable[[str], str | None]) -> str:
    """A regex (no anchors) matching every adaptable module of `LORA_MODULES` under an engine's names: `rename` maps
    a published module path (layer 0) to the engine's (None: the engine has no such module), `\\d+` for the layer."""
    names = {rename(m.format(i=0)) for m in LORA_MODULES}
    return "|".join(sorted(re.escape(n).replace(r"\.0\.", r"\.\d+\.", 1) for n in names if n is not None))


def engine_module(module: str) -> str:
    """A published module path -> the plugins' module path (`engine_name` of its weight, less `.weight`)."""
    return engine_name(f"{module}.weight").removesuffix(".weight")


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
