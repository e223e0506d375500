"""Pre-quantized checkpoints: which extra tensors config.json's `quantization_config` adds to the name table.

Read by `cognica.checkpoint.validate_entries` (names, shapes, dtypes) and by the weight front end
(`cognica.weights`), which loads the extras into the quantized linear layers the engines build.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cognica.config import CognicaConfig
from cognica.names import CheckpointError, canonical_name, expected_tensors

# Pre-quantized checkpoints: config.json's `quantization_config` in the compressed-tensors format llm-compressor
# writes ("int-quantized" / "float-quantized"), 8-bit weights (int8 or fp8) per channel or per tensor, input
# activations dynamic or static. A quantized Linear keeps its `weight` (now int8 / fp8, same shape) and adds the
# scheme's tensors: `weight_scale` (+ `weight_zero_point` if asymmetric), and for static inputs `input_scale`
# (+ `input_zero_point` if asymmetric). The engines fuse c_q/c_k/c_v and run the six projections through their
# quantized linear layers; lm_head, ve_gate and smear_gate (nanochat nn.Linear modules too) and the embeddings are
# served in float only.
QUANT_FORMATS = {"int-quantized": "int", "naive-quantized": None, "float-quantized": "float"}
QUANT_WEIGHT_DTYPES = {"int": "I8", "float": "F8_E4M3"}
QUANTIZABLE = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # in transformer.h.{i}
PER_TENSOR_SHAPES = ((1,), ())


@dataclass(frozen=True)
class QuantLayout:
    """What a checkpoint's quantization_config adds to the name table (canonical names)."""

    weight_dtypes: dict[str, str]  # quantized weight -> its safetensors dtype
    extras: dict[str, tuple[tuple[tuple[int, ...], ...], str]]  # extra tensor -> (allowed shapes, "float" or "I8")


def linear_modules(cfg: CognicaConfig) -> list[str]:
    """Canonical paths of every nn.Linear of nanochat's GPT: what a compressed-tensors target "Linear" reaches."""
    return [n.removesuffix(".weight") for n, shape in expected_tensors(cfg).items()
            if len(shape) == 2 and n.endswith(".weight") and not n.startswith(("transformer.wte.", "value_embeds."))]


def _matches(path: str, patterns: list[str], linear: bool) -> bool:
    """compressed-tensors matching (as vLLM's compressed_tensors.utils.find_matched_target): a module class name,
    `re:<regex>` (re.match) or an exact module path; paths are nanochat's, a wrapper prefix (`model.`) stripped."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], path) or re.match(p[3:], f"model.{path}"):
                return True
        elif (p == "Linear" and linear) or (p == "Embedding" and not linear) or canonical_name(p) == path:
            return True
    return False


def quantization_layout(cfg: CognicaConfig, quantization_config: dict | None = None) -> QuantLayout:
    """Parse config.json's quantization_config (`cfg.extra`'s, or the one given: an engine's HF config carries it;
    none: an empty layout); an unsupported scheme or a quantized module the engines cannot take raises
    CheckpointError naming it."""
    qc = quantization_config if quantization_config is not None else cfg.extra.get("quantization_config")
    layout = QuantLayout({}, {})
    if qc is None:
        return layout

    def refuse(why: str) -> CheckpointError:
        return CheckpointError(f"config.json quantization_config: {why}")

    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise refuse(f"quant_method {method!r} is not supported; cognica reads compressed-tensors 8-bit checkpoints "
                     "(int8 or fp8 weights, per channel or per tensor) as llm-compressor writes them")
    for key in ("sparsity_config", "transform_config"):
        if qc.get(key):
            raise refuse(f"{key} is not supported")
    ignore = list(qc.get("ignore") or [])
    embeddings = ["transformer.wte", *(f"value_embeds.{i}" for i in cfg.ve_layers)]
    linears = linear_modules(cfg)
    scheme_of: dict[str, tuple[str, dict, dict | None]] = {}
    for group_name, group in (qc.get("config_groups") or {}).items():
        targets = list(group.get("targets") or [])
        fmt = group.get("format") or qc.get("format")
        w, a = group.get("weights") or {}, group.get("input_activations")
        wtype = w.get("type")
        if fmt not in QUANT_FORMATS or QUANT_FORMATS[fmt] not in (None, wtype):
            raise refuse(f"{group_name}: format {fmt!r} with {wtype} weights is not supported (int-quantized or "
                         "float-quantized 8-bit weights)")
        if w.get("num_bits") != 8 or wtype not in QUANT_WEIGHT_DTYPES or w.get("strategy") not in ("channel", "tensor"):
            raise refuse(f"{group_name}: weights {w} are not supported (8-bit int or float, per channel or tensor)")
        if wtype == "float" and not w.get("symmetric", True):
            raise refuse(f"{group_name}: asymmetric fp8 weights are not a compressed-tensors scheme")
        if a is not None and (a.get("num_bits") != 8 or a.get("strategy") not in ("token", "tensor")
                              or a.get("strategy") == "token" and not a.get("dynamic")):
            raise refuse(f"{group_name}: input_activations {a} are not supported (8-bit, per token dynamic or per "
                         "tensor)")
        if group.get("output_activations"):
            raise refuse(f"{group_name}: output_activations are not supported")
        hit = [m for m in embeddings if _matches(m, targets, linear=False) and not _matches(m, ignore, False)]
        if hit:
            raise refuse(f"{group_name} quantizes {', '.join(hit)}: the embeddings are served in float only")
        for m in linears:
            if _matches(m, targets, linear=True) and not _matches(m, ignore, linear=True):
                if m in scheme_of:
                    raise refuse(f"{m} is matched by both {scheme_of[m][0]} and {group_name}")
                scheme_of[m] = (group_name, w, a)
    fixed = sorted(m for m in scheme_of if not m.startswith("transformer.h.") or not m.endswith(QUANTIZABLE))
    if fixed:
        names = ", ".join(fixed[:4]) + (" ..." if len(fixed) > 4 else "")
        raise refuse(f"quantizes {names}, which the engines serve in float only (lm_head, ve_gate and smear_gate are "
                     "not engine linear layers here); add 'lm_head', 're:.*ve_gate$', 're:.*smear_gate$' to its "
                     "ignore list")
    for i in range(cfg.n_layer):
        qkv = [scheme_of.get(f"transformer.h.{i}.attn.{p}", (None, None, None))[1:] for p in ("c_q", "c_k", "c_v")]
        if qkv.count(qkv[0]) != 3:
            raise refuse(f"transformer.h.{i}.attn.c_q/c_k/c_v are quantized differently; the engines fuse them into "
                         "one QKV projection, which takes one scheme")
    shapes = expected_tensors(cfg)
    for m, (_, w, a) in scheme_of.items():
        out = shapes[f"{m}.weight"][0]
        layout.weight_dtypes[f"{m}.weight"] = QUANT_WEIGHT_DTYPES[w["type"]]
        scale_shapes = ((out, 1),) if w["strategy"] == "channel" else PER_TENSOR_SHAPES
        layout.extras[f"{m}.weight_scale"] = (scale_shapes, "float")
        if not w.get("symmetric", True):
            layout.extras[f"{m}.weight_zero_point"] = (scale_shapes, "I8")
        if a is not None and not a.get("dynamic"):
            layout.extras[f"{m}.input_scale"] = (PER_TENSOR_SHAPES, "float")
            if not a.get("symmetric", True):
                layout.extras[f"{m}.input_zero_point"] = (PER_TENSOR_SHAPES, "I8")
    return layout
