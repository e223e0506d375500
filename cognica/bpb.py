"""Bits per byte of a text under the model, computed like nanochat's `evaluate_bpb` (loss_eval.py, a825e63).

The text is tokenized without specials, `<|bos|>` is prepended, and the ids are cut into windows of at
most `sequence_len` tokens that overlap by one token, so every token after the first is predicted exactly
once (the first token of each later window is context only). Then

    bpb = sum(-ln p(t)) / (ln 2 * sum(token_bytes[t]))   over predicted tokens t with token_bytes[t] > 0

Special tokens have 0 bytes in `token_bytes.pt` and drop out of both sums, as in nanochat. The engine
back ends (`cognica_vllm.bpb`, `cognica_sglang.bpb`, found through the `cognica.bpb_backends` entry points, so the
core imports no plugin) only supply the per-window log-probabilities.

PoE stage modes (`poe_exit_stage`, `poe_head`, `poe_force`; see `cognica.config`) are config overrides: the
reference takes them as `load_reference` keywords, vLLM as `hf_overrides`, SGLang as `json_model_override_args`,
so each mode's quality is measured on the same text by any engine. Bad options are refused before any model loads.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cognica.config import CognicaConfig

logger = logging.getLogger(__name__)

# prompt_logprobs(model_dir, windows, dtype, overrides=...) -> one list per window of log p(window[t] | window[:t]),
# t >= 1; `overrides` are config fields (the PoE stage options) the engine applies to config.json
LogprobFn = Callable[..., list[list[float]]]
# Windows stop this many tokens short of the context: engines reserve room for the sampled token (SGLang 0.5.23
# accepts at most context - 6 input tokens), and every engine must score the same windows.
WINDOW_MARGIN = 8
BACKENDS_GROUP = "cognica.bpb_backends"  # entry points NAME = module:prompt_logprobs, one per plugin (setup.py)
ENGINES = ("vllm", "sglang")


class EngineUnavailable(RuntimeError):
    """The engine's bpb back end cannot be imported in this environment (wrong venv)."""


def bits_per_byte(token_ids: Sequence[int], logprobs: Sequence[float], token_bytes: torch.Tensor) -> float:
    """Bits per byte of predicted tokens `token_ids` given their natural-log probabilities.

    Tokens with 0 bytes (specials) count in neither sum. Returns inf when no byte is counted, like nanochat.
    """
    if len(token_ids) != len(logprobs):
        raise ValueError(f"{len(token_ids)} token ids but {len(logprobs)} logprobs")
    ids = torch.as_tensor(list(token_ids), dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= token_bytes.numel()):
        raise ValueError(f"token id out of range for token_bytes of length {token_bytes.numel()}")
    nbytes = token_bytes.to(torch.int64)[ids]
    nats = torch.as_tensor(list(logprobs), dtype=torch.float64).neg()
    counted = nbytes > 0
    total_bytes = int(nbytes.sum())
    if total_bytes == 0:
        return float("inf")
    return float(nats[counted].sum()) / (math.log(2) * total_bytes)


def encode_text(model_dir: str | os.PathLike[str], text: str) -> list[int]:
    """`<|bos|>` + the text's ids: through the converted tokenizer.json if present, else the tiktoken pickle
    (restricted unpickler). Literal special-token strings in the text are encoded as ordinary text."""
    from cognica.tokenizer import BOS, load_tiktoken_pickle

    root = Path(model_dir)
    if (root / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(root / "tokenizer.json"))
        tok.encode_special_tokens = True  # "<|bos|>" inside the text is text, as with encode_ordinary
        bos = tok.token_to_id(BOS)
        if bos is None:
            raise ValueError(f"{root / 'tokenizer.json'}: no {BOS} token")
        return [bos] + tok.encode(text, add_special_tokens=False).ids
    enc = load_tiktoken_pickle(root / "tokenizer.pkl")
    return [enc.encode_single_token(BOS)] + enc.encode_ordinary(text)


def split_windows(ids: Sequence[int], max_len: int) -> list[list[int]]:
    """Windows of at most `max_len` ids overlapping by one, so ids[1:] are each predicted exactly once."""
    if max_len < 2:
        raise ValueError(f"windows need at least 2 tokens, got max_len={max_len}")
    ids = list(ids)
    windows, start = [], 0
    while start < len(ids) - 1:
        windows.append(ids[start : start + max_len])
        start += max_len - 1
    return windows


def poe_overrides(poe_exit_stage: int | None = None, poe_head: str | None = None,
                  poe_force: bool = False) -> dict[str, Any]:
    """The config overrides of the PoE options that are set (what the engines get as hf_overrides /
    json_model_override_args)."""
    out: dict[str, Any] = {}
    if poe_exit_stage is not None:
        out["poe_exit_stage"] = poe_exit_stage
    if poe_head is not None:
        out["poe_head"] = poe_head
    if poe_force:
        out["poe_force"] = True
    return out


def reference_logprobs(model_dir: str | os.PathLike[str], windows: list[list[int]], dtype: str = "float32",
                       progress: bool = True, overrides: dict[str, Any] | None = None) -> list[list[float]]:
    """Per-window log p(window[t] | window[:t]), t >= 1, from the pure-torch reference model."""
    from cognica.model import load_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_reference(model_dir, dtype=getattr(torch, dtype), device=device, **(overrides or {}))
    return [model.token_logprobs(w) for w in tqdm(windows, desc="reference logprobs", unit="window",
                                                   disable=not progress)]


def engine_logprob_fn(engine: str) -> LogprobFn:
    """The `prompt_logprobs` function of an engine back end, imported only when asked for."""
    if engine == "reference":
        return reference_logprobs
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose reference, vllm or sglang")
    found = [ep for ep in entry_points(group=BACKENDS_GROUP) if ep.name == engine]
    where = f"--engine {engine} needs the {engine} venv (.venv/{engine}) with cognica installed"
    if not found:
        raise EngineUnavailable(f"{where}: no {BACKENDS_GROUP!r} entry point named {engine!r} is installed")
    try:
        return found[0].load()
    except (ImportError, AttributeError) as e:
        raise EngineUnavailable(f"{where}: cannot load {found[0].value} ({type(e).__name__}: {e})") from e


@dataclass(frozen=True)
class BpbResult:
    bpb: float
    tokens: int  # predicted tokens (specials included)
    bytes: int  # bytes of the counted tokens
    windows: int


def evaluate_bpb(model_dir: str | os.PathLike[str], text: str, engine: str = "reference",
                 max_tokens: int | None = None, dtype: str = "float32",
                 overrides: dict[str, Any] | None = None) -> BpbResult:
    """Bits per byte of `text` under the checkpoint in `model_dir`, scored by `engine`; `overrides` selects a PoE
    stage mode (`poe_overrides(...)`), validated here (ConfigError) before any model loads."""
    root = Path(model_dir)
    cfg = CognicaConfig.from_file(root / "config.json")
    if overrides:
        replace(cfg, **overrides)  # a BP checkpoint without poe_force, a stage out of range, ...: ConfigError
    token_bytes = torch.load(root / "token_bytes.pt", weights_only=True)
    ids = encode_text(root, text)
    if max_tokens is not None:
        ids = ids[: max_tokens + 1]
    if len(ids) < 2:
        raise ValueError("the text has no tokens to score")
    windows = split_windows(ids, cfg.sequence_len - WINDOW_MARGIN)
    logger.info("scoring %d tokens in %d window(s) with %s", len(ids) - 1, len(windows), engine)
    fn = engine_logprob_fn(engine)
    per_window = fn(str(root), windows, dtype, overrides=overrides) if overrides else fn(str(root), windows, dtype)
    targets: list[int] = []
    logprobs: list[float] = []
    for w, lp in zip(windows, per_window, strict=True):
        lp = list(lp)
        if len(lp) == len(w) and lp and lp[0] is None:
            lp = lp[1:]  # an engine that reports the (unscored) first position as None
        if len(lp) != len(w) - 1:
            raise ValueError(f"{engine} returned {len(lp)} logprobs for a window of {len(w)} tokens")
        targets += w[1:]
        logprobs += lp
    counted = int(token_bytes.to(torch.int64)[torch.tensor(targets)].sum())
    return BpbResult(bits_per_byte(targets, logprobs, token_bytes), len(targets), counted, len(windows))


__all__ = ["BpbResult", "EngineUnavailable", "bits_per_byte", "encode_text", "engine_logprob_fn", "evaluate_bpb",
           "poe_overrides", "reference_logprobs", "split_windows"]
