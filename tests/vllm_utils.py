"""Helpers shared by the in-process vLLM test files (run in .venv/vllm and .venv/vllm-v2): greedy requests on token-id
prompts and reading their tokens and log-probs back; the PoE test checkpoint and first-process engine configs."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm import LLM, SamplingParams
from vllm.engine.arg_utils import EngineArgs

from cognica.factory import make_checkpoint

# The engine the tiny-checkpoint suites start (tests/vllm, tests/vllm_v2): float32, 1024 tokens of context in 32-token
# blocks, chunked prefill (64 tokens a step unless a suite says otherwise) with prefix caching, token-id prompts (no
# tokenizer); each suite adds what it tests.
TINY_ENGINE = dict(dtype="float32", max_model_len=1024, block_size=32, seed=0, gpu_memory_utilization=0.3,
                   max_num_batched_tokens=64, enable_chunked_prefill=True, enable_prefix_caching=True,
                   skip_tokenizer_init=True)


def tiny_llm(ckpt: Path, **kw: Any) -> LLM:
    """An in-process engine on `ckpt` with `TINY_ENGINE`'s arguments, overridden and extended by `kw` (`model` too:
    a slot may serve another checkpoint under one of its names)."""
    return LLM(**{"model": str(ckpt), **TINY_ENGINE, **kw})


class EngineSlot:
    """One vLLM engine at a time: asking for another setting (a new `name`) tears the current one down first.
    `shutdown(llm)` runs before the engine is dropped (vLLM 0.34: `tests.vllm_v2_utils.close`); `defaults` are the
    suite's engine arguments on top of `TINY_ENGINE`."""

    def __init__(self, ckpt: Path, shutdown: Callable[[LLM], None] | None = None, **defaults: Any):
        self.ckpt, self.shutdown, self.defaults = ckpt, shutdown, defaults
        self.name: str | None = None
        self.llm: LLM | None = None

    def get(self, name: str, **kw: Any) -> LLM:
        if self.name != name:
            self.close()
            self.llm, self.name = tiny_llm(self.ckpt, **{**self.defaults, **kw}), name
        return self.llm

    def close(self) -> None:
        if self.llm is not None:
            if self.shutdown is not None:
                self.shutdown(self.llm)
            del self.llm
            self.llm, self.name = None, None
            gc.collect()


def make_poe_checkpoint(path: Path) -> Path:
    """The PoE test checkpoint: tiny width, 8 layers, a stage end every 2 layers (poe_mode "flat"), seed 5."""
    return make_checkpoint(path, preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8, poe_mode="flat",
                           poe_every=2)


def engine_config(ckpt: Path, **kw):
    """vLLM's config as `EngineArgs.create_engine_config` builds it in the first process (no worker starts): float32,
    eager, 1024 tokens of context, 32-token blocks, plus `kw`."""
    args = dict(model=str(ckpt), max_model_len=1024, block_size=32, dtype="float32", skip_tokenizer_init=True,
                enforce_eager=True)
    return EngineArgs(**{**args, **kw}).create_engine_config()


def greedy(n: int, prompt_logprobs: bool = False) -> SamplingParams:
    """n greedy tokens with the chosen token's logprob (and every prompt token's, if asked)."""
    return SamplingParams(max_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True, detokenize=False,
                          prompt_logprobs=0 if prompt_logprobs else None)


def generate(llm: LLM, prompts: list[list[int]], n: int, prompt_logprobs: bool = False) -> list:
    return llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(n, prompt_logprobs), use_tqdm=False)


def answer(out) -> tuple[list[int], list[float]]:
    """The generated token ids and each one's logprob."""
    c = out.outputs[0]
    return list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)]


def run(llm: LLM, prompts: list[list[int]], n: int, prompt_logprobs: bool = False) -> list[tuple[list[int],
                                                                                                  list[float], object]]:
    """(tokens, logprobs, RequestOutput) per prompt."""
    return [(*answer(o), o) for o in generate(llm, prompts, n, prompt_logprobs)]


def check_prefix_cache_hit_then_decode(llm: LLM, ref, what: str) -> None:
    """A 600-token prompt, then the same prompt + 90 tokens: the second hits the prefix cache (>= 512 cached tokens)
    and its 40 greedy tokens and log-probs equal the reference's (float32)."""
    from tests.utils import assert_fp32_parity, random_prompts

    [base] = random_prompts([600], seed=5)
    run(llm, [base], n=4)
    extended = base + random_prompts([90], seed=6)[0]
    tokens, logprobs, out = run(llm, [extended], n=40)[0]
    assert out.num_cached_tokens >= 512, f"{what}: expected a prefix-cache hit on the 600 shared tokens, got " \
        f"{out.num_cached_tokens} cached"
    assert_fp32_parity(ref, extended, tokens, logprobs, what, n_new=40)


def prompt_logprobs(out, prompt: list[int]) -> list[float]:
    """vLLM's log p(prompt[t] | prompt[:t]) for t >= 1 (`prompt_logprobs=0`: each entry holds the prompt token;
    entry 0 is None). A request with prompt log-probs never reads the prefix cache (`SamplingParams.__post_init__` in
    vllm/sampling_params.py), so every position is computed."""
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(prompt), \
        f"expected {len(prompt)} prompt logprob entries, got {len(out.prompt_logprobs or [])}"
    return [d[tok].logprob for d, tok in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)]


def preemptions(llm: LLM) -> int:
    """vLLM's own counter `vllm:num_preemptions` (`PrometheusStatLogger.__init__` in vllm/v1/metrics/loggers.py), summed
    over engines."""
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
