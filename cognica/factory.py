"""Checkpoint factory: a directory in the exact published layout, with random non-degenerate weights.

The real 2.6 GB weights cannot be downloaded here, so tests and benchmarks run on these. Every
learned scalar is pushed away from its identity value (resid 1, x0 0, smear 0, backout 0, ...) and
the output projections are non-zero, so an engine that skips any feature fails the parity tests;
the lm_head scale keeps logits inside the soft-cap's working range, not saturated.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cognica.config import CognicaConfig
from cognica.names import expected_tensors

PRESETS: dict[str, CognicaConfig] = {
    # 4 layers (S S S L), head_dim 64, context 1024 -> S window 256: long prompts cross it several times
    "tiny": CognicaConfig(n_layer=4, n_head=2, n_kv_head=2, n_embd=128, sequence_len=1024),
    # 8 layers, head_dim 128 like the release, context 2048 -> S window 512
    "small": CognicaConfig(n_layer=8, n_head=2, n_kv_head=2, n_embd=256, sequence_len=2048),
    # the released shape: 175 tensors, 1,384,122,122 params
    "full": CognicaConfig(),
}

GENERATION_CONFIG = {"bos_token_id": 32759, "eos_token_id": 32759, "do_sample": False, "max_length": 2048}
# Shaped like the published files: a remote-code auto_map we never execute.
PUBLISHED_TOKENIZER_CONFIG = {
    "tokenizer_class": "CognicaPoETokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_cognica_poe.CognicaPoETokenizer", None]},
    "bos_token": "<|bos|>",
    "eos_token": "<|bos|>",
    "model_max_length": 2048,
    "clean_up_tokenization_spaces": False,
}
PUBLISHED_SPECIAL_TOKENS_MAP = {"bos_token": "<|bos|>", "eos_token": "<|bos|>"}


def random_tensor(name: str, shape: tuple[int, ...], cfg: CognicaConfig, gen: torch.Generator) -> torch.Tensor:
    """One fp32 tensor for `name`, scaled like nanochat's init but with nothing at identity."""
    d = cfg.n_embd
    s = math.sqrt(3.0 / d)  # uniform bound with std 1/sqrt(d)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    if name == "transformer.wte.weight":
        return torch.randn(shape, generator=gen) * 0.8
    if name == "lm_head.weight":
        return torch.randn(shape, generator=gen) * (3.0 / math.sqrt(d))  # logit std ~3 on a normed x
    if name.startswith("value_embeds."):
        return uniform(-s, s)
    if name == "resid_lambdas":
        base = torch.tensor([1.15 - 0.10 * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)])
        return base + uniform(-0.05, 0.05)
    if name == "x0_lambdas":
        base = torch.tensor([0.20 - 0.15 * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)])
        return base + uniform(0.05, 0.15)
    if name == "smear_lambda":
        return uniform(0.4, 0.8)
    if name == "backout_lambda":
        return uniform(0.2, 0.4)
    if name == "smear_gate.weight":
        return uniform(-1.0, 1.0)
    if name.endswith("ve_gate.weight"):
        return uniform(-1.0, 1.0)
    if name.endswith("mlp.c_fc.weight"):
        return uniform(-0.4 * s, 0.4 * s)
    if name.endswith("mlp.c_proj.weight"):
        return uniform(-0.5 * s / 2, 0.5 * s / 2)  # fan-in 4d
    if name.endswith("attn.c_proj.weight"):
        return uniform(-0.5 * s, 0.5 * s)
    return uniform(-s, s)  # c_q, c_k, c_v


def make_weights(cfg: CognicaConfig, seed: int, dtype: torch.dtype = torch.bfloat16, progress: bool = True,
                 prefix: str = "") -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_tensors(cfg)
    out = {}
    for name, shape in tqdm(shapes.items(), desc="random weights", unit="tensor", disable=not progress):
        out[prefix + name] = random_tensor(name, shape, cfg, gen).to(dtype).contiguous()
    return out


def write_tokenizer_files(out: Path, seed: int = 0) -> None:
    """tokenizer.pkl (a pickled tiktoken Encoding, as nanochat writes it), token_bytes.pt, and the
    published tokenizer_config.json / special_tokens_map.json (with their remote-code auto_map)."""
    from cognica.factory_tokenizer import train_factory_encoding, write_token_bytes

    enc = train_factory_encoding(seed)
    with open(out / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    write_token_bytes(enc, out / "token_bytes.pt")
    (out / "tokenizer_config.json").write_text(json.dumps(PUBLISHED_TOKENIZER_CONFIG, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(PUBLISHED_SPECIAL_TOKENS_MAP, indent=2) + "\n")


def make_checkpoint(
    out: str | os.PathLike[str], preset: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
    progress: bool = True, tokenizer: bool = True, prefix: str = "", **overrides: int | str,
) -> Path:
    """Write config.json, generation_config.json, model.safetensors and the tokenizer files to `out`."""
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = replace(PRESETS[preset], **overrides) if overrides else PRESETS[preset]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    gen_cfg = dict(GENERATION_CONFIG, max_length=cfg.sequence_len)
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    weights = make_weights(cfg, seed, dtype, progress, prefix)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_tokenizer_files(out, seed)
    return out
