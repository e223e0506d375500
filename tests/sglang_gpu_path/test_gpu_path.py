"""SGLang's GPU attention path (the triton backend on the hybrid SWA KV pool) against the reference, float32.

On a CPU the plugin serves SGLang with `torch_native` and the SWA pool off; GPU users get the pool with the triton,
flashinfer or fa3 backend. This step runs the triton backend's own kernels on this CPU through Triton's interpreter
(tests/sglang_gpu_path_driver.py: what makes that possible, and why), on the tiny checkpoint (S layers keep 256 keys
before the query), in 64-token prefill chunks with mixed chunks on: two prompts of 400 and 250 tokens together, 12
new tokens each (decode past the window, and across it at position 256), then a 430-token prompt that continues the
first request: its first 400+ tokens a radix-cache hit. Greedy tokens identical, every prompt and output log-prob
within FP32_LOGPROB_ATOL.

Two engines: SGLang's own decode attention (`COGNICA_KERNELS=engine`, what CUDA runs by default), whose window SGLang
0.5.23 counts one key short unless the plugin reports W + 1 (`cognica_sglang.attention.engine_window_size`); and the
plugin's CPU decode attention (the CPU default), which translates full-pool slots into the live SWA sub-pool itself.
Each engine runs in its own process under a hard timeout (a bad launch hangs instead of raising).

    TRITON_INTERPRET=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python -m pytest -q tests/sglang_gpu_path
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference  # noqa: E402
from cognica_sglang.cpu_stub import stub_path  # noqa: E402
from tests.sglang_utils import check_parity, random_prompt  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
S_WINDOW = 256
NEW = 12
LONG, SHORT = random_prompt(400, seed=31), random_prompt(250, seed=32)
# then the 400-token request's prompt and output with 18 new tokens: 430 tokens, the first 411 or so a radix hit
# (prompt log-probs asked from the last cached token on: SGLang recomputes a prefix it must return log-probs for)
PLAN = [{"prompts": [LONG, SHORT], "max_new": NEW}, {"continues": [0, 0], "extra": random_prompt(19, seed=33)[1:],
                                                     "max_new": 6}]
ENGINE = {"chunked_prefill_size": 64, "enable_mixed_chunk": True, "max_total_tokens": 4096}
TIMEOUT_S = 600


@pytest.fixture(scope="module")
def ref(tiny_ckpt):
    return load_reference(tiny_ckpt, dtype=torch.float32)


def serve_plan(ckpt: Path, kernels: str) -> tuple[dict, str]:
    """Run the plan in tests/sglang_gpu_path_driver.py with COGNICA_KERNELS=`kernels`; (its result, its log)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "SGLANG_USE_CPU_ENGINE": "1", "COGNICA_KERNELS": kernels,
           "PYTHONPATH": os.pathsep.join([stub_path(), str(REPO)])}
    spec = json.dumps({"plan": PLAN, "engine": ENGINE})
    cmd = [sys.executable, "-m", "tests.sglang_gpu_path_driver", str(ckpt), spec]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the triton-backend engine did not answer within {TIMEOUT_S} s (a hung kernel launch?):\n"
                    f"{log[-4000:]}")
    results = [line for line in log.splitlines() if line.startswith("RESULT=")]
    assert proc.returncode == 0 and results, f"the driver failed (exit {proc.returncode}):\n{log[-6000:]}"
    return json.loads(results[-1][len("RESULT="):]), log


@pytest.mark.parametrize("kernels", ["engine", "auto"], ids=["sglang-decode", "plugin-decode"])
def test_triton_backend_on_the_swa_pool_matches_reference(tiny_ckpt, ref, kernels):
    result, log = serve_plan(tiny_ckpt, kernels)
    assert tuple(result["attention_backends"]) == ("triton", "triton"), result["attention_backends"]
    assert "sliding window memory pool" in log.lower() and not result["disable_hybrid_swa_memory"], (
        "the hybrid SWA KV pool must be on (the GPU path); the engine's log says otherwise"
    )
    (first, second) = (b["outputs"] for b in result["batches"])
    for prompt, out, name in ((LONG, first[0], "400-token prompt"), (SHORT, first[1], "250-token prompt")):
        decode_positions = range(len(prompt), len(prompt) + NEW)
        assert max(decode_positions) >= S_WINDOW, "the plan must decode past the S window"
        check_parity(ref, prompt, out, NEW, f"{kernels}: {name} (decode at {decode_positions.start}.."
                                            f"{decode_positions.stop - 1}, S window {S_WINDOW})", chunk=64)
    hit, hit_prompt = second[0], result["batches"][1]["prompts"][0]
    assert len(hit_prompt) == 430 and hit_prompt[:400] == LONG
    cached = hit["meta_info"]["cached_tokens"]
    assert cached >= 400, f"expected a radix hit on the first 400+ tokens, got {cached} cached"
    assert len(hit["meta_info"]["input_token_logprobs"]) == 19, "prompt log-probs from the last cached token on"
    check_parity(ref, hit_prompt, hit, 6, f"{kernels}: 430-token prompt after a {cached}-token radix hit", chunk=64)
