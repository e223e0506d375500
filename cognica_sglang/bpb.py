"""SGLang back end of `cognica bpb`: prompt log-probs of token windows (no sampling)."""

from __future__ import annotations

import json
import os
from typing import Any


def prompt_logprobs(model_dir: str, windows: list[list[int]], dtype: str = "float32",
                    engine: Any = None, overrides: dict[str, Any] | None = None) -> list[list[float]]:
    """log p(window[t] | window[:t]) for t >= 1, per window, from SGLang's input-token log-probs. `overrides` (PoE
    stage options) become `json_model_override_args` (applied to the loaded config:
    `get_config` in sglang/srt/utils/hf_transformers/config.py)."""
    import sglang

    own = engine is None
    if own:
        os.environ.setdefault("SGLANG_EXTERNAL_MODEL_PACKAGE", "cognica_sglang")
        engine = sglang.Engine(model_path=model_dir, dtype=dtype, skip_tokenizer_init=True, random_seed=0,
                               disable_cuda_graph=True, skip_server_warmup=True, log_level="error",
                               json_model_override_args=json.dumps(overrides or {}),
                               **({} if _has_cuda() else {"device": "cpu", "attention_backend": "torch_native"}))
    try:
        outs = engine.generate(input_ids=windows, sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                               return_logprob=True, logprob_start_len=0)
        return [[lp for lp, *_ in o["meta_info"]["input_token_logprobs"][1:]] for o in outs]
    finally:
        if own:
            engine.shutdown()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
