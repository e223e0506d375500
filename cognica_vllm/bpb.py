"""vLLM back end of `cognica bpb`: prompt log-probs of token windows (no sampling)."""

from __future__ import annotations

import os
from typing import Any

from vllm import LLM, SamplingParams

from cognica.config import CognicaConfig


def prompt_logprobs(model_dir: str, windows: list[list[int]], dtype: str = "float32",
                    llm: LLM | None = None, overrides: dict[str, Any] | None = None) -> list[list[float]]:
    """log p(window[t] | window[:t]) for t >= 1, per window, from vLLM's prompt log-probs. `overrides` (PoE stage
    options) become `hf_overrides`, applied to the loaded config (`get_config` in vllm/transformers_utils/config.py)."""
    if llm is None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        cfg = CognicaConfig.from_file(os.path.join(model_dir, "config.json"))
        llm = LLM(model=model_dir, dtype=dtype, skip_tokenizer_init=True, max_model_len=cfg.sequence_len,
                  gpu_memory_utilization=0.3, seed=0, **({"hf_overrides": overrides} if overrides else {}))
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": w} for w in windows], sp)
    return [[lp[tok].logprob for lp, tok in zip(o.prompt_logprobs[1:], w[1:], strict=True)]
            for o, w in zip(outs, windows, strict=True)]
