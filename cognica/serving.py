"""What both engine plugins check before they build the model: the checkpoint on disk and the served context."""

from __future__ import annotations

import os
from pathlib import Path

from cognica.checkpoint import open_checkpoint
from cognica.config import CognicaConfig


def check_before_build(cfg: CognicaConfig, model_path: str | os.PathLike[str] | None, context_len: int,
                       context_flag: str) -> None:
    """Validate a local checkpoint directory (names, shapes, dtypes, files: `open_checkpoint`) before the engine
    allocates anything, and refuse a served context longer than the training context.

    Both engines refuse such a context themselves unless told otherwise (vLLM: VLLM_ALLOW_LONG_MAX_MODEL_LEN=1,
    `ModelConfig.get_and_verify_max_len`; SGLang: SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1, `ModelConfig`'s
    context-length check); past `sequence_len` the L layers would slide and RoPE would see untrained positions,
    none of it tested, so it is refused here too. `context_flag` is the engine's option (`--max-model-len`)."""
    if model_path and Path(model_path).is_dir():
        open_checkpoint(model_path)  # a bad checkpoint fails here, with one message, before any allocation
    if context_len > cfg.sequence_len:
        raise ValueError(f"cognica: {context_flag} {context_len} is longer than the {cfg.sequence_len}-token "
                         f"context the model was trained with; use {context_flag} {cfg.sequence_len} or less")
