"""The serving rules both engine plugins apply, each written once: which layers slide in a served context
(`served_window_left`), which tensor-parallel sizes the heads allow (`tensor_parallel_problem`), what is refused
(`refusals`, one message per rule, over engine-neutral `ServingSettings` that each plugin's `config_checks` fills
from its engine's arguments) and the checkpoint check before any allocation (`check_before_build`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cognica.checkpoint import open_checkpoint
from cognica.config import CognicaConfig

SMEAR_WHY = ("smear reads the previous token from the KV slots this model's forwards wrote; these settings fill KV "
             "slots another way and are not supported")


@dataclass(frozen=True)
class ServingSettings:
    """What a plugin read from its engine's arguments, in the terms of the rules below.

    - foreign_kv: the engine options that fill KV slots without this model's forward, or feed tokens without ids,
      each as "--flag (why)"; smear reads the previous token's id from the KV slots, so they are refused;
    - pooling: the engine option that pools the final hidden state ("--runner pooling", "--is-embedding"), or None;
    - tensor_parallel, pipeline_parallel: the engine's sizes;
    - head_on_vocab_shard: the engine applies the head to each tensor-parallel rank's vocabulary shard before
      gathering (SGLang's LogitsProcessor with tp > 1), where Log-OP's per-stage log_softmax needs the whole
      vocabulary;
    - context_len, context_flag: the served context and the engine's option for it (None: not known yet).
    """

    foreign_kv: tuple[str, ...] = ()
    pooling: str | None = None
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    head_on_vocab_shard: bool = False
    context_len: int | None = None
    context_flag: str = "--max-model-len"


def served_window_left(cfg: CognicaConfig, layer: int, context_len: int) -> int | None:
    """The keys before the query that `layer` attends to when `context_len` tokens are served (a query sees itself
    and window_left keys before it, as `cognica.model` attends), or None where the window covers every position of
    the served context: full attention there. A query at the last position, context_len - 1, has context_len - 1
    keys before it, so a window of at least that many never drops a key."""
    window = cfg.window_left[layer]
    return window if window < context_len - 1 else None


def has_sliding_layers(cfg: CognicaConfig, context_len: int) -> bool:
    """Whether any built layer drops keys within `context_len` tokens (`served_window_left`)."""
    return any(served_window_left(cfg, i, context_len) is not None for i in range(cfg.n_active_layers))


def tensor_parallel_problem(cfg: CognicaConfig, tp_size: int) -> str | None:
    """Why `tp_size` cannot shard the heads, or None. Both engines' QKVParallelLinear (vLLM's and SGLang's
    `QKVParallelLinear.__init__` in layers/linear.py) split the query heads evenly and, when tp_size >= n_kv_head,
    replicate each KV head over tp_size // n_kv_head ranks (`divide`, which asserts exact division), else split them
    evenly; `CognicaConfig.local_kv_heads` picks a rank's heads the same way."""
    kv = cfg.n_kv_head
    if cfg.n_head % tp_size or (kv % tp_size if tp_size <= kv else tp_size % kv):
        return (f"cognica: tensor parallel size {tp_size} must divide the {cfg.n_head} query heads and divide, or be a "
                f"multiple of, the {kv} KV heads")
    return None


def refusals(cfg: CognicaConfig, settings: ServingSettings) -> list[str]:
    """One message per rule `settings` breaks (empty: served)."""
    found = []
    if settings.foreign_kv:
        found.append(f"cognica: {SMEAR_WHY}: {'; '.join(settings.foreign_kv)}")
    if settings.pooling and cfg.poe_head == "logop":
        found.append(f"cognica: {settings.pooling} pools the final hidden state, which the Log-OP head "
                     "(poe_head='logop') does not have (it combines several stage ends); serve it without "
                     "poe_head='logop'")
    if cfg.poe_head == "logop" and settings.pipeline_parallel > 1:
        found.append("cognica: poe_head='logop' reads every stage end on the last pipeline rank: use "
                     "pipeline_parallel_size=1")
    if cfg.poe_head == "logop" and settings.head_on_vocab_shard:
        found.append("cognica: poe_head='logop' needs the whole vocabulary on one rank (log_softmax per stage); it is "
                     "not supported with tensor parallelism")
    if (problem := tensor_parallel_problem(cfg, settings.tensor_parallel)) is not None:
        found.append(problem)
    if settings.context_len is not None and settings.context_len > cfg.sequence_len:
        # Both engines refuse such a context themselves unless told otherwise (vLLM: VLLM_ALLOW_LONG_MAX_MODEL_LEN=1,
        # `ModelConfig.get_and_verify_max_len`; SGLang: SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1, `ModelConfig`'s
        # context-length check); past `sequence_len` the L layers would slide and RoPE would see untrained
        # positions, none of it tested
        flag = settings.context_flag
        found.append(f"cognica: {flag} {settings.context_len} is longer than the {cfg.sequence_len}-token "
                     f"context the model was trained with; use {flag} {cfg.sequence_len} or less")
    return found


def refuse(cfg: CognicaConfig, settings: ServingSettings) -> None:
    """Raise one ValueError naming every rule `settings` breaks (`refusals`), if any."""
    found = refusals(cfg, settings)
    if found:
        raise ValueError("; ".join(found) if len(found) > 1 else found[0])


def check_before_build(cfg: CognicaConfig, model_path: str | os.PathLike[str] | None,
                       settings: ServingSettings) -> None:
    """Validate a local checkpoint directory (names, shapes, dtypes, files: `open_checkpoint`) before the engine
    allocates anything, then `refuse` what `settings` (the served context, the parallel sizes) breaks."""
    if model_path and Path(model_path).is_dir():
        open_checkpoint(model_path)  # a bad checkpoint fails here, with one message, before any allocation
    refuse(cfg, settings)
