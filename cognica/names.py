"""The published tensor names: the one table of what the architecture stores (`expected_tensors`), the wrapper
prefixes stripped before comparing (`canonical_name`), and the one message for missing and unexpected tensors
(`mismatch_problems`), used by checkpoint validation (`cognica.checkpoint`) and the engines' weight front end
(`cognica.weights`). Quantization's extra tensors are added to this table by `cognica.quantization`.
"""

from __future__ import annotations

from cognica.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig

WRAPPER_PREFIXES = ("model.", "_orig_mod.", "module.")
# Buffers some exporters save; never weights of the architecture.
IGNORABLE = frozenset({"cos", "sin", "transformer.cos", "transformer.sin"})
VOCAB_PAD = 64  # nanochat pads the vocab rows to a multiple of 64


class CheckpointError(ValueError):
    """A checkpoint that does not match the architecture; the message names the tensor or file."""


def canonical_name(name: str) -> str:
    """Strip any wrapper prefixes: `model._orig_mod.transformer.wte.weight` -> `transformer.wte.weight`."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    return name


def padded_vocab(cfg: CognicaConfig) -> int:
    return -(-cfg.vocab_size // VOCAB_PAD) * VOCAB_PAD


def expected_tensors(cfg: CognicaConfig) -> dict[str, tuple[int, ...]]:
    """Canonical (nanochat) name -> shape, for every tensor of the architecture."""
    d, v, kv = cfg.n_embd, padded_vocab(cfg), cfg.kv_dim
    out: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (v, d)}
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        out[f"{p}.attn.c_q.weight"] = (cfg.n_head * cfg.head_dim, d)
        out[f"{p}.attn.c_k.weight"] = (kv, d)
        out[f"{p}.attn.c_v.weight"] = (kv, d)
        out[f"{p}.attn.c_proj.weight"] = (d, cfg.n_head * cfg.head_dim)
        if i in cfg.ve_layers:
            out[f"{p}.attn.ve_gate.weight"] = (cfg.n_kv_head, VE_GATE_CHANNELS)
        out[f"{p}.mlp.c_fc.weight"] = (cfg.mlp_hidden, d)
        out[f"{p}.mlp.c_proj.weight"] = (d, cfg.mlp_hidden)
    for i in cfg.ve_layers:
        out[f"value_embeds.{i}.weight"] = (v, kv)
    out["lm_head.weight"] = (v, d)
    out["resid_lambdas"] = (cfg.n_layer,)
    out["x0_lambdas"] = (cfg.n_layer,)
    out["smear_gate.weight"] = (1, SMEAR_CHANNELS)
    out["smear_lambda"] = (1,)
    out["backout_lambda"] = (1,)
    return out


SCALAR_NAMES = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")


def mismatch_problems(missing: list[str], unknown: list[str]) -> list[str]:
    """The problems of a set of names against the table: tensors the architecture needs that are absent, and tensors
    it has no place for (at most 8 of each named)."""
    problems = []
    if missing:
        more = " ..." if len(missing) > 8 else ""
        problems.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:8])}{more}")
    if unknown:
        problems.append(f"unexpected tensor(s) not in the architecture: {', '.join(sorted(unknown)[:8])}"
                        f"{' ...' if len(unknown) > 8 else ''}")
    return problems
