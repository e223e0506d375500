"""vLLM 0.34's V2 model runner against the reference, on this CPU through Triton's interpreter (run in .venv/vllm-v2,
scripts/test.sh step vllm-v2; the environment and patches: tests/vllm_v2_shim).

What GPU users run: the V2 runner (its own padding, per-KV-cache-group block tables and slot mappings), the
TRITON_ATTN backend and the hybrid KV-cache manager (one group per layer pattern); compiled, as vLLM's default is
on the CPU platform (Dynamo and Inductor; CUDA graphs need a GPU). One engine, float32, 64-token chunked prefill,
prefix caching, and a pool of 66 blocks (the least vLLM starts with at a 1024-token context), so that a batch of
short requests crossing a block boundary together is preempted. Greedy tokens identical and log-probs within 1e-3 of
`cognica.model`. Interpreted steps cost 0.5-3 s: few tokens per scenario.

    TRITON_INTERPRET=1 VLLM_TARGET_DEVICE=cpu CUDA_VISIBLE_DEVICES= .venv/vllm-v2/bin/python -m pytest \
        tests/vllm_v2/test_parity.py
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from tests.utils import assert_fp32_parity, assert_prompt_logprobs_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tests.vllm_utils import answer, generate, preemptions, prompt_logprobs, tiny_llm  # noqa: E402
from tests.vllm_v2_utils import attention_impls, close, kv_cache_groups, model_runner_class  # noqa: E402

CHUNK = 64
NEW = 8
POOL_BLOCKS = 66


@pytest.fixture(scope="module")
def ref(tiny_ckpt: Path):
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    engine = tiny_llm(tiny_ckpt, max_num_batched_tokens=CHUNK, max_num_seqs=16, num_gpu_blocks_override=POOL_BLOCKS,
                      disable_log_stats=False)  # stats on: the preemption counter
    yield engine
    close(engine)
    del engine
    gc.collect()


def test_engine_is_the_v2_runner_with_triton_attention_compiled_and_hybrid(llm):
    from vllm.config import CompilationMode

    assert model_runner_class(llm).startswith("vllm.v1.worker.gpu."), \
        f"expected the V2 model runner (vllm/v1/worker/gpu/), got {model_runner_class(llm)}"
    assert attention_impls(llm) == ["TritonAttentionImpl"], f"attention: {attention_impls(llm)}"
    config = llm.llm_engine.vllm_config
    # the CPU platform's compiled default (`CpuPlatform.check_and_update_config` turns VLLM_COMPILE into one Dynamo
    # trace compiled by Inductor; CUDA's piecewise graphs need a GPU)
    compilation = config.compilation_config
    assert (compilation.mode, compilation.backend) == (CompilationMode.DYNAMO_TRACE_ONCE, "inductor"), \
        f"expected vLLM's compiled default on CPU, got {compilation.mode} / {compilation.backend!r}"
    assert len(kv_cache_groups(llm)) == 4, f"SSSL: one KV-cache group per layer, got {kv_cache_groups(llm)}"


def test_batch_past_the_window_in_chunks_matches_reference(llm, ref):
    """Three requests (420, 9, 240 tokens) prefilled together in 64-token chunks; the 420-token one past the 256-key
    S window, the 240-token one decoding across it; prompt log-probs at every position of the longest."""
    prompts = random_prompts([420, 9, 240], seed=11)
    outs = generate(llm, prompts, NEW, prompt_logprobs=True)
    for prompt, out in zip(prompts, outs, strict=True):
        tokens, logprobs = answer(out)
        what = f"V2 compiled, {len(prompt)}-token prompt in a batch of 3"
        assert_fp32_parity(ref, prompt, tokens, logprobs, what, n_new=NEW)
    assert_prompt_logprobs_parity(ref, prompts[0], prompt_logprobs(outs[0], prompts[0]), "V2, 420-token prompt",
                                  chunk=CHUNK)


def test_prefix_cache_hit_then_decode_matches_reference(llm, ref):
    """A 320-token prompt, then the same + 20 tokens: the second reads >= 288 tokens from the prefix cache (past the
    256-key window, so the S layers' groups hit too) and decodes to the reference's tokens."""
    [base] = random_prompts([320], seed=5)
    generate(llm, [base], 1)
    extended = base + random_prompts([20], seed=6)[0]
    [out] = generate(llm, [extended], NEW)
    assert out.num_cached_tokens >= 288, f"expected a prefix-cache hit on 320 shared tokens, got " \
        f"{out.num_cached_tokens} cached"
    tokens, logprobs = answer(out)
    assert_fp32_parity(ref, extended, tokens, logprobs, "V2, after a prefix-cache hit", n_new=NEW)


def test_preempted_requests_match_reference(llm, ref):
    """16 requests of 31 tokens, each holding one block in each of the 4 groups until its second decode step needs
    a second: admitted while blocks are free, they outgrow the pool before the first ones finish, so vLLM preempts
    some, recomputes them, and every answer still equals the reference."""
    prompts = random_prompts([31] * 16, seed=310)
    before = preemptions(llm)
    outs = generate(llm, prompts, NEW)
    preempted = [i for i, o in enumerate(outs) if o.metrics.num_preemptions > 0]
    assert preemptions(llm) - before >= 1 and preempted, \
        f"no preemption with {POOL_BLOCKS} blocks: the scenario no longer exercises recompute"
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        tokens, logprobs = answer(out)
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"V2, request {i}"
                           f"{' (preempted)' if i in preempted else ''}", n_new=NEW)
