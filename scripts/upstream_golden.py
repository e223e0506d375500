"""Write tests/golden/upstream_nanochat_a825e63.safetensors: upstream nanochat's own logits on factory checkpoints.

Usage (from the repository root; NANOCHAT is a checkout of karpathy/nanochat at a825e63, kept outside the repo):

    git --git-dir=<nanochat mirror> archive a825e63 nanochat | tar -x -C /tmp/nanochat_a825e63
    NANOCHAT_DTYPE=float32 .venv/vllm/bin/python scripts/upstream_golden.py /tmp/nanochat_a825e63

For each case of `tests/test_upstream_oracle.CASES` it builds the factory checkpoint, loads its tensors into
upstream's `nanochat.gpt.GPT` (our canonical tensor names are upstream's state-dict keys; the key sets and shapes
are asserted equal, nothing is renamed), runs upstream's full-sequence forward (`kv_cache=None`) on CPU in float32
and stores per position the logits at 32 fixed vocab columns (the last real one included), the log-sum-exp over
the whole vocab and the argmax, plus upstream's per-layer `window_sizes` and value-embedding layers.
Nothing of upstream is stubbed: on a CPU, `nanochat/flash_attention.py` picks its own SDPA path (FA3 needs CUDA),
and `nanochat.common` picks float32 (NANOCHAT_DTYPE=float32 makes that explicit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
N_COLS = 32  # vocab columns kept per position (plus lse and argmax over the whole vocab)


def upstream_commit(nanochat: Path) -> str:
    """The commit of the checkout when it is a git work tree of its own; "" otherwise (then --commit is used)."""
    if not (nanochat / ".git").exists():
        return ""
    return subprocess.run(["git", "-C", str(nanochat), "rev-parse", "HEAD"], check=True, capture_output=True,
                          text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("nanochat", type=Path, help="checkout of karpathy/nanochat at a825e63 (outside this repo)")
    ap.add_argument("--commit", default="a825e63f81e62e2e9fd38655e9b2e39417620545",
                    help="the checkout's commit, recorded in the golden file when it is not a git work tree")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "golden" / "upstream_nanochat_a825e63.safetensors")
    args = ap.parse_args()
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    sys.path[:0] = [str(args.nanochat.resolve()), str(REPO)]

    import nanochat.gpt as upstream
    from safetensors.torch import save_file

    from cognica.model import load_reference
    from tests.core.test_upstream_oracle import CASES, case_checkpoint, case_config, case_ids, logit_summary, weights_digest

    assert upstream.COMPUTE_DTYPE == torch.float32, f"upstream compute dtype is {upstream.COMPUTE_DTYPE}"
    tensors: dict[str, torch.Tensor] = {}
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides, seq_len, seed in CASES:
            cfg = case_config(overrides)
            ckpt = case_checkpoint(Path(tmp) / name, overrides, seed)
            # our loader only reads and validates the file here; upstream gets the tensors as stored
            ours = load_reference(ckpt, dtype=torch.float32).state_dict()
            gpt = upstream.GPT(upstream.GPTConfig(
                sequence_len=cfg.sequence_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, window_pattern=cfg.window_pattern))
            theirs = gpt.state_dict()
            missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
            assert not missing and not extra, f"{name}: name map broken: upstream-only {missing}, ours-only {extra}"
            bad = [k for k in theirs if theirs[k].shape != ours[k].shape]
            assert not bad, f"{name}: shapes differ from upstream's for {bad}"
            gpt.load_state_dict(ours, strict=True)
            gpt.eval()
            ids = case_ids(name, seq_len, cfg.vocab_size, seed)
            with torch.no_grad():
                logits = gpt(ids)[0]  # kv_cache=None: upstream's full-sequence (training) forward
            assert logits.dtype == torch.float32 and logits.shape == (seq_len, cfg.vocab_size), logits.shape
            g = torch.Generator().manual_seed(seed)
            cols = torch.randperm(cfg.vocab_size - 1, generator=g)[: N_COLS - 1].sort().values
            cols = torch.cat([cols, torch.tensor([cfg.vocab_size - 1])])
            summary = logit_summary(logits, cols)
            tensors[f"{name}.ids"] = ids[0].to(torch.int32)
            tensors[f"{name}.cols"] = cols.to(torch.int32)
            tensors.update({f"{name}.{k}": v for k, v in summary.items()})
            cases.append({
                "name": name, "overrides": overrides, "seq_len": seq_len, "seed": seed,
                "weights_sha256": weights_digest(ours),
                "upstream_window_left": [w[0] for w in gpt.window_sizes],
                "upstream_ve_layers": sorted(int(i) for i in gpt.value_embeds),
            })
            print(f"{name}: windows {gpt.window_sizes}, ve layers {cases[-1]['upstream_ve_layers']}, "
                  f"logits {tuple(logits.shape)}")
    commit = upstream_commit(args.nanochat) or args.commit
    meta = {
        "upstream_commit": commit,
        "upstream_file": "karpathy/nanochat:nanochat/gpt.py (GPT.forward, kv_cache=None, float32, CPU)",
        "checkout": "git --git-dir=<clone of karpathy/nanochat> archive a825e63 nanochat"
                    " | tar -x -C /tmp/nanochat_a825e63",
        "command": "NANOCHAT_DTYPE=float32 .venv/vllm/bin/python scripts/upstream_golden.py /tmp/nanochat_a825e63"
                   f"  # torch {torch.__version__}",
        "cases": json.dumps(cases),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out), metadata=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
