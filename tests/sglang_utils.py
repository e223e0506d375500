"""Helpers of the SGLang engine suites (tests/sglang/test_parity.py, tests/sglang/test_release_shape.py): seeded
token-id prompts, one engine at a time, and the fp32 parity check on `Engine.generate` outputs.

SGLang-only (imports nothing from SGLang itself, but its outputs' layout is SGLang's `meta_info`)."""

from __future__ import annotations

import os
import random
from typing import Any

from cognica.model import CognicaGPT
from tests.utils import FP32_LOGPROB_ATOL, assert_prompt_logprobs_parity, assert_token_count

BOS = 32759
ENGINE_ARGS: dict[str, Any] = dict(
    device="cpu", attention_backend="torch_native", disable_cuda_graph=True, skip_server_warmup=True,
    skip_tokenizer_init=True, enable_mixed_chunk=True, random_seed=0, log_level="error",
)


def random_prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [BOS] + [rng.randrange(0, BOS) for _ in range(n - 1)]


def greedy(max_new: int) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}


def lps(pairs: list) -> list[float]:
    return [p[0] for p in pairs]


def run(engine: Any, prompts: list[list[int]], max_new: int, start: int = 0) -> list[dict]:
    """Greedy generation with output logprobs and prompt logprobs from position `start`."""
    return engine.generate(input_ids=prompts, sampling_params=greedy(max_new), return_logprob=True,
                           logprob_start_len=start)


class EngineSlot:
    """One engine at a time (2 cores): asking for another setting shuts the current one down."""

    def __init__(self, ckpt: os.PathLike, **base: Any):
        self.ckpt, self.base, self.name, self.engine = ckpt, base, None, None

    def get(self, name: str, **overrides: Any) -> Any:
        import sglang

        if self.name != name:
            self.close()
            # EXTERNAL_MODEL_PACKAGE skips importing SGLang's 250 built-in model modules in every process.
            os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "cognica_sglang"
            args = {**ENGINE_ARGS, **self.base, **overrides}
            self.engine, self.name = sglang.Engine(model_path=str(self.ckpt), **args), name
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine, self.name = None, None


def check_parity(ref: CognicaGPT, prompt: list[int], out: dict, n_new: int, what: str,
                 chunk: int | None = None) -> None:
    """`n_new` greedy tokens equal to the reference's; output logprobs and every returned prompt logprob (from
    `logprob_start_len` on) within FP32_LOGPROB_ATOL. `chunk` (the prefill chunk size) only labels a failure."""
    meta = out["meta_info"]
    got_out = lps(meta["output_token_logprobs"])
    assert_token_count(out["output_ids"], got_out, n_new, what)
    expected = ref.generate([prompt], n_new)[0]
    assert out["output_ids"] == expected, f"{what}: greedy tokens differ from the reference at step " \
        f"{next(i for i, (a, b) in enumerate(zip(out['output_ids'], expected)) if a != b)}"
    ref_lp = ref.token_logprobs(prompt + expected)
    err_out = max(abs(a - b) for a, b in zip(got_out, ref_lp[len(prompt) - 1:]))
    assert err_out < FP32_LOGPROB_ATOL, f"{what}: output logprobs off by {err_out:.2e}"
    got_in = lps(meta["input_token_logprobs"])
    start = len(prompt) - len(got_in)  # logprob_start_len; its own entry has no logprob (nothing before it)
    if len(got_in) > 1:
        assert_prompt_logprobs_parity(ref, prompt, got_in[1:], what, start=start + 1, chunk=chunk)


def server_command(model_dir: os.PathLike, port: int, *extra: str) -> list[str]:
    """`sglang.launch_server` in its CPU form (torch_native attention, float32, no CUDA graphs), plus `extra`."""
    import sys

    return [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--device", "cpu",
            "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
            "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "8192", *extra]


def serve_sglang(model_dir: os.PathLike, log: os.PathLike, *extra: str):
    """`server_command(model_dir, a free port, *extra)` as a context manager yielding the running server
    (`tests.server_utils.serve`, up to 300 s to start). SGLANG_EXTERNAL_MODEL_PACKAGE is unset: the server must find
    the model through the plugin's entry point alone."""
    from tests.server_utils import free_port, serve

    port = free_port()
    return serve(server_command(model_dir, port, *extra), "default", port, log,
                 unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",), startup_s=300, model_dir=model_dir)


def engine_start_refusal(model_dir: os.PathLike, engine_kwargs: str) -> tuple[int, str, str]:
    """Try `sglang.Engine(model_dir, CPU form, **engine_kwargs)` in a fresh process, counting the processes it starts
    (as tests/engine_start_driver.py does). Returns (exit code, stdout, stderr): exit 0 with
    "STARTED <n> REFUSED <error type> <message>" when the start raised, 3 when the engine started."""
    import subprocess
    import sys

    code = (
        "import multiprocessing.process as mp, sglang, sys\n"
        "started, start = [], mp.BaseProcess.start\n"
        "mp.BaseProcess.start = lambda self: (started.append(self.name), start(self))\n"
        "try:\n"
        f"    sglang.Engine(model_path={str(model_dir)!r}, device='cpu', attention_backend='torch_native',"
        " skip_tokenizer_init=True, disable_cuda_graph=True, skip_server_warmup=True, max_total_tokens=4096,"
        f" log_level='error', {engine_kwargs})\n"
        "except Exception as e:\n"
        "    print('STARTED', len(started), 'REFUSED', type(e).__name__, e)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    return proc.returncode, proc.stdout, proc.stderr
