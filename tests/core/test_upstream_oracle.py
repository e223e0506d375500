"""`cognica.model` against golden logits from upstream nanochat's own GPT (karpathy/nanochat a825e63).

The engine parity tests compare the engines with `cognica.model`, and all three call the same `cognica.layers`
functions and constants, so a wrong formula there would pass all of them. Here the oracle is upstream's own
`nanochat/gpt.py` forward: `scripts/upstream_golden.py` built each case's factory checkpoint, loaded it into
upstream's `GPT` (CPU, float32, full-sequence forward, its SDPA attention path) and stored, for every position,
the logits at a fixed set of vocab columns, the log-sum-exp over the whole vocab and the argmax. The exact command
is in the golden file's metadata. Upstream's code is not in this repository.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from cognica.factory import PRESETS, make_checkpoint
from cognica.model import CognicaGPT, load_reference

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "upstream_nanochat_a825e63.safetensors"
ATOL = 1e-4  # both sides run float32 on CPU; measured differences are ~1e-6

# The cases the golden file must cover (the generator writes them; the test checks them):
# (name, factory overrides of the tiny preset, sequence length, seed of the weights)
CASES: list[tuple[str, dict[str, Any], int, int]] = [
    # the tiny preset itself: 4 layers SSSL, MHA, S window 256: the sequence crosses the S window
    ("tiny_sssl", {}, 300, 11),
    # GQA 4:2, 5 layers (odd: value embeddings on even layers), "SSL", vocab 1000 (padded to 1024);
    # context 256 -> S window 128 and L window 256: the sequence crosses both, so the L layers slide too
    ("gqa_odd_ssl", {"n_layer": 5, "n_head": 4, "n_kv_head": 2, "window_pattern": "SSL", "sequence_len": 256,
                     "vocab_size": 1000}, 300, 12),
    # MQA (one KV head), 3 layers "SSL", head_dim 16, context 384 -> S 128, L 384, sequence 400 crosses both
    ("mqa_3layer_ssl", {"n_layer": 3, "n_head": 4, "n_kv_head": 1, "n_embd": 64, "window_pattern": "SSL",
                        "sequence_len": 384}, 400, 13),
]


def case_config(overrides: dict[str, Any]):
    return replace(PRESETS["tiny"], **overrides)


def case_checkpoint(out: Path, overrides: dict[str, Any], seed: int) -> Path:
    """The factory checkpoint of one case: float32 weights, no tokenizer files (only logits are compared)."""
    return make_checkpoint(out, preset="tiny", seed=seed, dtype=torch.float32, progress=False, tokenizer=False,
                           **overrides)


def case_ids(name: str, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """The token ids of one case: [1, seq_len], reproducible, drawn from the whole (unpadded) vocab."""
    return torch.randint(0, vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed + 1000))


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical names and float32 bytes of every tensor, so a changed factory is named as such."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def logit_summary(logits: torch.Tensor, cols: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the golden file keeps of [T, vocab] fp32 logits: columns `cols`, log-sum-exp and argmax per position."""
    return {"logits": logits[:, cols].contiguous(), "lse": torch.logsumexp(logits, dim=-1),
            "argmax": logits.argmax(dim=-1).to(torch.int32)}


def load_golden() -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(GOLDEN), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def golden() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta, tensors = load_golden()
    return {k: json.loads(v) if k == "cases" else v for k, v in meta.items()}, tensors


def test_golden_file_covers_the_required_shapes(golden):
    meta, _ = golden
    cases = {c["name"]: c for c in meta["cases"]}
    assert sorted(cases) == sorted(n for n, *_ in CASES), "golden cases differ from CASES: regenerate the file"
    cfgs = [case_config(c["overrides"]) for c in cases.values()]
    assert any(c["seq_len"] > 1 + min(c["upstream_window_left"]) for c in cases.values()), "no sequence past S"
    assert any(c["seq_len"] > 1 + max(c["upstream_window_left"]) for c in cases.values()), "no sequence past L"
    assert any(c.n_kv_head < c.n_head for c in cfgs), "no GQA case (n_kv_head < n_head)"
    assert any(c.n_layer % 2 for c in cfgs), "no odd layer count"
    assert any(c.window_pattern == "SSL" for c in cfgs), "no 'SSL' window pattern"
    assert meta["upstream_commit"].startswith("a825e63"), f"golden made from {meta['upstream_commit']}"


@pytest.mark.parametrize("name, overrides, seq_len, seed", CASES, ids=[c[0] for c in CASES])
def test_config_derives_upstream_windows_and_value_embedding_layers(golden, name, overrides, seq_len, seed):
    case = {c["name"]: c for c in golden[0]["cases"]}[name]
    cfg = case_config(overrides)
    assert list(cfg.window_left) == case["upstream_window_left"], \
        f"{name}: window_left {cfg.window_left} != upstream's window_size[0] {case['upstream_window_left']}"
    assert list(cfg.ve_layers) == case["upstream_ve_layers"], \
        f"{name}: value-embedding layers {cfg.ve_layers} != upstream's {case['upstream_ve_layers']}"


@pytest.mark.parametrize("name, overrides, seq_len, seed", CASES, ids=[c[0] for c in CASES])
def test_reference_logits_match_upstream_nanochat(golden, tmp_path_factory, name, overrides, seq_len, seed):
    meta, tensors = golden
    case = {c["name"]: c for c in meta["cases"]}[name]
    assert (case["overrides"], case["seq_len"], case["seed"]) == (overrides, seq_len, seed), \
        f"{name}: golden case {case} differs from CASES: regenerate with: {meta['command']}"
    ckpt = case_checkpoint(tmp_path_factory.mktemp(name), overrides, seed)
    model: CognicaGPT = load_reference(ckpt, dtype=torch.float32)
    assert weights_digest(model.state_dict()) == case["weights_sha256"], \
        f"{name}: cognica.factory now makes other weights than the golden file saw; regenerate: {meta['command']}"
    ids = case_ids(name, seq_len, model.config.vocab_size, seed)
    assert torch.equal(ids[0].to(torch.int32), tensors[f"{name}.ids"]), f"{name}: token ids differ from the golden"
    with torch.no_grad():
        ours = logit_summary(model(ids)[0], tensors[f"{name}.cols"].long())
    for key in ("logits", "lse"):
        want, got = tensors[f"{name}.{key}"], ours[key]
        err = (got - want).abs()
        err = err.amax(dim=-1) if err.ndim == 2 else err
        bad = (err > ATOL).nonzero().flatten().tolist()
        assert not bad, (f"{name}: {key} differ from upstream nanochat at {len(bad)}/{seq_len} positions, first "
                         f"{bad[:8]} (max {err.max().item():.2e} at {err.argmax().item()}; windows "
                         f"{model.config.window_left})")
    diverge = (ours["argmax"] != tensors[f"{name}.argmax"]).nonzero().flatten().tolist()
    assert not diverge, f"{name}: greedy token differs from upstream's at positions {diverge[:8]}"
