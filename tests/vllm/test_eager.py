"""vLLM's eager path (`enforce_eager`) with a KV pool too small for a batch (run in .venv/vllm).

One eager float32 engine on the tiny checkpoint (1024-token context, 256-key S windows, 64-token prefill chunks) with a
pool of POOL_BLOCKS KV blocks: enough for one request of the full context, far too few for a batch that decodes long
answers, so vLLM preempts running requests (frees their blocks, recomputes them later from scratch, `Scheduler.schedule`
and `Scheduler._preempt_request` in vllm/v1/core/sched/scheduler.py). Smear reads the previous token through the KV
slots, so a recomputed request must come out exactly as the reference computes it. The long and chunked scenarios run
here too, per position, on the eager path the server tests use (tests/vllm/test_parity.py runs the same scenarios
compiled).
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

from tests.vllm_utils import answer, generate, preemptions, tiny_llm  # noqa: E402

CHUNK = 64
# 32-token blocks from one shared pool, drawn by 4 KV-cache groups of one layer each, 1 full + 3 sliding
# (`_get_kv_cache_groups_uniform_page_size` in vllm/v1/core/kv_cache_utils.py). A 1024-token request needs 32 full + 3 x
# 11 sliding = 65 blocks (vLLM refuses to start with fewer); 6 requests decoding to 156-306 tokens need ~180.
POOL_BLOCKS = 72


@pytest.fixture(scope="module")
def ref(tiny_ckpt: Path):
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    engine = tiny_llm(tiny_ckpt, enforce_eager=True, max_num_batched_tokens=CHUNK, max_num_seqs=16,
                      num_gpu_blocks_override=POOL_BLOCKS, disable_log_stats=False)  # stats on: the preemption counter
    yield engine
    del engine
    gc.collect()


def test_engine_is_eager_with_the_small_pool(llm):
    from vllm.config import CompilationMode

    config = llm.llm_engine.vllm_config
    assert config.compilation_config.mode == CompilationMode.NONE, "enforce_eager should turn torch.compile off"
    assert config.cache_config.num_gpu_blocks == POOL_BLOCKS, f"pool of {config.cache_config.num_gpu_blocks} blocks"


@pytest.mark.parametrize("n_prompt, n_new", [(950, 24), (3 * CHUNK + 5, 130)],
                         ids=["950-token-prompt", "decode-across-the-window"])
def test_long_and_chunked_prompts_match_reference_at_every_position(llm, ref, n_prompt, n_new):
    [prompt] = random_prompts([n_prompt], seed=300 + n_prompt)
    [out] = generate(llm, [prompt], n_new, prompt_logprobs=True)
    tokens, logprobs = answer(out)
    what = f"eager, {n_prompt}-token prompt in {CHUNK}-token chunks"
    assert_fp32_parity(ref, prompt, tokens, logprobs, what, n_new=n_new)
    got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)]
    assert_prompt_logprobs_parity(ref, prompt, got, what, chunk=CHUNK)


def test_preempted_requests_answer_exactly_as_alone(llm, ref):
    """Six requests that each fit alone but not together: vLLM preempts some of them mid-decode (its counter says
    so), recomputes them, and every greedy answer equals the same request run alone and the reference."""
    n = 96
    prompts = random_prompts([60, 90, 120, 150, 180, 210], seed=310)
    before = preemptions(llm)
    outs = generate(llm, prompts, n)
    preempted = [i for i, o in enumerate(outs) if o.metrics.num_preemptions > 0]
    assert preemptions(llm) - before >= 1 and preempted, \
        f"no preemption with {POOL_BLOCKS} blocks: the scenario no longer exercises recompute"
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        tokens, logprobs = answer(out)
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"request {i} ({len(prompt)}-token prompt) in the batch",
                           n_new=n)
    for i in preempted:
        [alone] = generate(llm, [prompts[i]], n)
        assert answer(alone)[0] == answer(outs[i])[0], \
            f"request {i}, preempted {outs[i].metrics.num_preemptions}x, differs from the same request alone"
