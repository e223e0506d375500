"""The release's windows through vLLM (run in .venv/vllm): a checkpoint with the release's context and windows.

The `small` factory preset has `sequence_len` 2048 like the release, so its S layers keep 512 keys before the query
(513 with the query, vLLM's count) and its L layers are full attention up to the 2048-token context; head_dim is
128 as released, the width is small (8 layers of 256) so prompts of 1,500-2,040 tokens stay fast in float32. One
compiled float32 engine (vLLM's default path) prefills in 128-token chunks, so every long prompt crosses chunk
boundaries and the 512-key window many times. A decode past position 2,049 (where the L layers would start to
slide) cannot happen: max_model_len above the 2048-token training context is refused.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.factory import make_checkpoint
from cognica.model import load_reference
from tests.utils import assert_fp32_parity, assert_prompt_logprobs_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import answer  # noqa: E402
from tests.vllm_utils import generate as generate_n  # noqa: E402
from tests.vllm_utils import prompt_logprobs as prompt_logprobs_of  # noqa: E402

CONTEXT = 2048
CHUNK = 128  # max_num_batched_tokens: a 2,040-token prompt is prefilled in 16 chunks


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cognica.tokenizer import convert_tokenizer

    out = make_checkpoint(tmp_path_factory.mktemp("release") / "small", preset="small", seed=0, progress=False)
    convert_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def ref(release_ckpt: Path):
    model = load_reference(release_ckpt, dtype=torch.float32)
    cfg = model.config
    assert (cfg.sequence_len, cfg.window_keys[0] - 1, cfg.head_dim) == (CONTEXT, 512, 128), \
        "the preset no longer has the release's context, S window and head_dim"
    return model


@pytest.fixture(scope="module")
def llm(release_ckpt: Path):
    engine = LLM(model=str(release_ckpt), dtype="float32", max_model_len=CONTEXT, block_size=32, seed=0,
                 gpu_memory_utilization=0.3, max_num_batched_tokens=CHUNK, enable_chunked_prefill=True,
                 enable_prefix_caching=True, max_num_seqs=8, skip_tokenizer_init=True)
    yield engine
    del engine
    gc.collect()


def generate(llm: LLM, prompts: list[list[int]], n: int, prompt_logprobs: bool = True):
    return generate_n(llm, prompts, n, prompt_logprobs)


def check(ref, prompt: list[int], out, n: int, what: str, prompt_logprobs: bool = True) -> None:
    tokens, logprobs = answer(out)
    assert_fp32_parity(ref, prompt, tokens, logprobs, what, n_new=n)
    if prompt_logprobs:
        assert_prompt_logprobs_parity(ref, prompt, prompt_logprobs_of(out, prompt), what)


def test_context_longer_than_training_is_refused(release_ckpt):
    """max_model_len 2,100 would let a decode cross position 2,049, where the L layers start to slide: vLLM itself
    refuses a max_model_len above max_position_embeddings (= sequence_len; `_get_and_verify_max_len` in
    vllm/config/model.py) before any engine exists, naming the 2048-token limit. (With VLLM_ALLOW_LONG_MAX_MODEL_LEN=1
    the model refuses it: tests/vllm/test_cuda_paths.py::test_context_longer_than_training_is_refused.)"""
    with pytest.raises(ValueError, match=r"max_model_len \(2100\) is greater than the derived max_model_len "
                                         r"\(max_position_embeddings=2048"):
        LLM(model=str(release_ckpt), dtype="float32", max_model_len=2100, skip_tokenizer_init=True)


def test_2040_token_prompt_chunked_matches_reference_at_every_position(llm, ref):
    [prompt] = random_prompts([2040], seed=201)  # 16 chunks of 128; decode fills the context to 2048
    [out] = generate(llm, [prompt], 8)
    check(ref, prompt, out, 8, "2,040-token prompt in 128-token chunks")


def test_batch_of_long_prompts_then_decode_to_the_context_end(llm, ref):
    """Four requests share every 128-token prefill step (chunk edges fall mid-prompt), then decode together; the
    longest decodes from position 2,000 to the end of the 2,048-token context."""
    lengths = [1500, 1777, 1901, 2000]
    prompts = random_prompts(lengths, seed=202)
    n = CONTEXT - max(lengths)
    for prompt, out in zip(prompts, generate(llm, prompts, n), strict=True):
        check(ref, prompt, out, n, f"{len(prompt)}-token prompt in a batch of 4")


def test_prefix_cache_hit_on_a_long_prompt_then_decode(llm, ref):
    [base] = random_prompts([1600], seed=203)
    generate(llm, [base], 1, prompt_logprobs=False)
    extended = base + random_prompts([300], seed=204)[0]
    [out] = generate(llm, [extended], 40, prompt_logprobs=False)  # prompt logprobs would skip the cache
    assert out.num_cached_tokens >= 1024, f"expected a prefix-cache hit on the 1,600 shared tokens, got " \
        f"{out.num_cached_tokens} cached"
    check(ref, extended, out, 40, "1,900-token prompt after a 1,600-token prefix-cache hit", prompt_logprobs=False)
