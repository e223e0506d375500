"""Per-request checks of the SGLang plugin, run in the tokenizer manager before a request reaches the scheduler."""

from __future__ import annotations

from typing import Any


def refuse_requests_that_crash_the_scheduler(manager: Any, obj: Any, input_ids: list[int], *args: Any,
                                              **kwargs: Any) -> None:
    """BEFORE hook on TokenizerManager._validate_one_request (SGLang's plugin HookRegistry). SGLang 0.5.23 range-checks
    neither prompt token ids (an id >= vocab_size crashes the scheduler in the embedding lookup) nor the number of
    top logprobs (more than the vocab crashes `topk`); prompt embeddings (`input_embeds`, which the tokenizer manager
    passes on with `--disable-radix-cache`) would raise inside the scheduler's forward and drop the connection, and
    embeddings placed at positions (`positional_embed_overrides`, GenerateReqInput's field) would replace rows the
    value embeddings and smear compute from token ids.
    A ValueError here becomes a 400 and the server keeps serving."""
    cfg = manager.model_config
    if getattr(cfg.hf_config, "model_type", None) != "cognica_poe":
        return None
    if getattr(obj, "input_embeds", None) is not None:
        raise ValueError("cognica: input_embeds are not supported (value embeddings and smear need token ids); "
                         "send text or input_ids")
    if getattr(obj, "positional_embed_overrides", None) is not None:
        raise ValueError("cognica: positional_embed_overrides are not supported (value embeddings and smear read "
                         "token ids, not embeddings); send text or input_ids")
    bad = next((t for t in input_ids or () if not isinstance(t, int) or t < 0 or t >= cfg.vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad!r} is out of range: valid ids are 0..{cfg.vocab_size - 1}")
    top = getattr(obj, "top_logprobs_num", None)
    for n in top if isinstance(top, list) else [top]:
        if isinstance(n, int) and n > cfg.vocab_size:
            raise ValueError(f"logprobs={n} asks for more alternatives than the {cfg.vocab_size}-token vocabulary")
    return None
