"""Pipeline parallelism (PP=2) on vLLM 0.34's V2 runner (.venv/vllm-v2, Triton interpreted; see
tests/vllm_v2/test_parity.py) against the fp32 reference.

The V2 runner hands later pipeline stages `input_ids=None` unless the model declares `requires_raw_input_tokens`
(`GPUModelRunner.execute_model` in vllm/v1/worker/gpu/model_runner.py); ours reads token ids on every stage (value
embeddings), so it declares it. The 8-layer checkpoint splits 0-3 | 4-7, with value-embedding layers on both ranks.
Each rank is a worker process of its own (`tests/vllm_parallel_driver.py`, one core each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from cognica.factory import make_checkpoint
from cognica.model import load_reference
from tests.utils import assert_fp32_parity, random_prompts

NEW = 4
PROMPTS = random_prompts([300], seed=8)  # past the 256-key S window, prefilled in 64-token chunks
ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_parallel_2_matches_reference(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "tiny8", preset="tiny", seed=0, progress=False, tokenizer=False, n_layer=8)
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "tests.vllm_parallel_driver", str(ckpt), "--pp", "2", "--prompts",
           json.dumps(PROMPTS), "--new", str(NEW), "--eager"]  # eager: compiled in tests/vllm_v2/test_parity.py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT,
                          start_new_session=True)  # vLLM's shutdown signals its process group: not ours
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT=")), None)
    errors = [x for x in proc.stdout.splitlines() + proc.stderr.splitlines() if "Error" in x][-8:]
    assert line is not None, f"PP=2 run failed (exit {proc.returncode}):\n" + "\n".join(errors)
    ref = load_reference(ckpt, dtype=torch.float32)
    for prompt, (tokens, logprobs) in zip(PROMPTS, json.loads(line.removeprefix("RESULT=")), strict=True):
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"V2 PP=2, {len(prompt)}-token prompt", n_new=NEW)
