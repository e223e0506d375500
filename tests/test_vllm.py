"""vLLM plugin parity against the reference model (run in .venv/vllm).

One compiled float32 engine (chunked prefill with 64-token steps, prefix caching on) serves the parity
scenarios; one eager bf16 engine checks the other mode and dtype. The tiny factory checkpoint has a
1024-token context and 256-key S windows, so long prompts cross the window several times.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from tests.utils import assert_bf16_close, assert_fp32_parity, bf16_tolerance, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM, SamplingParams  # noqa: E402  (after the env defaults above)

CHUNK = 64  # max_num_batched_tokens: every prompt longer than this is prefilled in chunks
NEW = 24


def engine(model: Path, **kw) -> LLM:
    args = dict(model=str(model), max_model_len=1024, block_size=32, seed=0, gpu_memory_utilization=0.3,
                max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=True,
                max_num_seqs=16)
    args.update(kw)
    return LLM(**args)


def greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True, detokenize=False)


def run(llm: LLM, prompts: list[list[int]], n: int = NEW):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [next(iter(d.values())).logprob for d in o.outputs[0].logprobs], o)
            for o in outs]


@pytest.fixture(scope="module")
def ref32(tiny_ckpt: Path):
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm32(tiny_ckpt: Path):
    llm = engine(tiny_ckpt, dtype="float32")  # compiled: vLLM's default torch.compile path
    yield llm
    del llm
    gc.collect()


def test_short_prompt_matches_reference(llm32, ref32):
    [prompt] = random_prompts([7])
    tokens, logprobs, _ = run(llm32, [prompt])[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "short prompt")


def test_long_prompt_crossing_the_window_matches_reference(llm32, ref32):
    [prompt] = random_prompts([950], seed=2)  # 950 + 24 <= 1024; the S window (256 keys) is crossed 3x
    tokens, logprobs, _ = run(llm32, [prompt])[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "950-token prompt, chunked prefill by 64")


def test_decode_past_the_window_matches_reference(llm32, ref32):
    [prompt] = random_prompts([200], seed=3)  # decode runs from position 200 to 330, across the 256 window
    tokens, logprobs, _ = run(llm32, [prompt], n=130)[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "decode across the window")


def test_sixteen_mixed_requests_batched_match_reference(llm32, ref32):
    lengths = [1, 3, 17, 31, 32, 33, 64, 65, 100, 200, 255, 256, 257, 300, 511, 700]
    prompts = random_prompts(lengths, seed=4)
    for prompt, (tokens, logprobs, _) in zip(prompts, run(llm32, prompts)):
        assert_fp32_parity(ref32, prompt, tokens, logprobs, f"batched prompt of {len(prompt)} tokens")


def test_prefix_cache_hit_then_decode_matches_reference(llm32, ref32):
    [base] = random_prompts([600], seed=5)
    run(llm32, [base], n=4)
    extended = base + random_prompts([90], seed=6)[0]
    tokens, logprobs, out = run(llm32, [extended], n=40)[0]
    assert out.num_cached_tokens >= 512, f"expected a prefix-cache hit on the 600 shared tokens, got " \
        f"{out.num_cached_tokens} cached"
    assert_fp32_parity(ref32, extended, tokens, logprobs, "after a prefix-cache hit")


def test_bf16_eager_engine_within_calibrated_tolerance(tiny_ckpt, llm32, ref32):
    ref16 = load_reference(tiny_ckpt, dtype=torch.bfloat16)
    prompts = random_prompts([40, 600], seed=7)
    llm16 = engine(tiny_ckpt, dtype="bfloat16", enforce_eager=True)
    try:
        for prompt, (tokens, logprobs, _) in zip(prompts, run(llm16, prompts)):
            tol = bf16_tolerance(ref32, ref16, prompt, NEW)
            assert_bf16_close(ref32, prompt, tokens, logprobs, tol, f"bf16 eager, {len(prompt)}-token prompt")
    finally:
        del llm16
        gc.collect()
