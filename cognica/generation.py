"""Decoding, as nanochat keeps it in engine.py beside the model: the KV cache (`KVCache`), sampling (`sample`), the
decoding loop (`decode`) of both reference models, and `generate()` of the transformers-facing one
(`cognica.hf.CognicaPoEForCausalLM`).

KV-cache decoding on `cognica.model.CognicaGPT` with transformers' own semantics for what it supports: greedy or
sampling (`do_sample`, `temperature`, `top_k`, `top_p`), `repetition_penalty`, `max_new_tokens` / `max_length`,
`eos_token_id` (stop; finished rows padded with `pad_token_id`), a `generation_config` object or keywords, as
`model.generate(...)` and `pipeline("text-generation")` pass them. The logits processors are transformers' own
classes. Left-padded batches (`attention_mask`) give each row the tokens of its prompt alone. Keywords transformers
passes by default (`output_attentions=False`, `num_beams=1`, `streamer=None`, ...) are accepted; anything that would
change the output (beams, several sequences, logits processors, ...) raises one ValueError naming it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# GenerationConfig fields we honour; the rest must keep their default (checked through to_diff_dict()).
SUPPORTED = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
})
# Fields transformers itself records on a config; they do not change generation.
_BOOKKEEPING = frozenset({"transformers_version", "_from_model_config", "_commit_hash", "cache_implementation"})
# What transformers' generation reads a None of these fields as: the same value set explicitly changes nothing
# (the pipeline passes output_attentions=False, output_hidden_states=False; users pass num_beams=1, ...).
_NONE_MEANS = {"num_beams": 1, "num_return_sequences": 1, "num_beam_groups": 1, "length_penalty": 1.0,
               "min_length": 0, "min_new_tokens": 0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
               "diversity_penalty": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
               "output_attentions": False, "output_hidden_states": False, "output_scores": False,
               "output_logits": False, "return_dict_in_generate": False, "renormalize_logits": False,
               "remove_invalid_values": False, "early_stopping": False, "low_memory": False}
# `generate()` arguments that are not GenerationConfig fields; accepted when off (None, False, empty) because that
# is what transformers passes by default. `tokenizer` (read only for stop strings, which are refused) is ignored.
_OFF_ARGUMENTS = frozenset({"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                            "assistant_model", "streamer", "negative_prompt_ids", "negative_prompt_attention_mask",
                            "custom_generate", "assistant_tokenizer", "use_model_defaults", "tokenizer"})


@dataclass
class KVCache:
    """Per-layer keys/values [B, H_kv, T, D] plus the smear state: the last token's normed embedding; after a
    padded forward also which cached keys are real tokens ([B, T] bool)."""

    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    pos: int = 0
    prev_embedding: torch.Tensor | None = field(default=None)
    key_valid: torch.Tensor | None = field(default=None)

    @classmethod
    def empty(cls, n_layer: int) -> KVCache:
        return cls([None] * n_layer, [None] * n_layer)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


def _unchanged(key: str, value: Any, default: Any) -> bool:
    return value == default or (default is None and key in _NONE_MEANS and value == _NONE_MEANS[key])


def _merged_config(default: Any, kwargs: dict[str, Any]) -> Any:
    from transformers import GenerationConfig

    config = kwargs.pop("generation_config", None)
    config = copy.deepcopy(config if config is not None else (default or GenerationConfig()))
    on = sorted(k for k in _OFF_ARGUMENTS.intersection(kwargs)
                if k != "tokenizer" and not (k == "use_model_defaults" and kwargs[k] is not False)
                and kwargs[k] not in (None, False) and not (hasattr(kwargs[k], "__len__") and len(kwargs[k]) == 0))
    if on:
        raise ValueError(f"generate(): {', '.join(on)} is not supported by the Cognica reference model "
                         f"(supported: {', '.join(sorted(SUPPORTED))})")
    for k in _OFF_ARGUMENTS.intersection(kwargs):
        kwargs.pop(k)
    unknown = [k for k in kwargs if not hasattr(config, k)]
    if unknown:
        raise ValueError(f"generate() got keyword(s) {', '.join(sorted(unknown))}, which the Cognica reference model "
                         f"does not support (supported: {', '.join(sorted(SUPPORTED))})")
    for k, v in kwargs.items():
        setattr(config, k, v)
    changed = set(config.to_diff_dict()) | set(kwargs)
    unsupported = sorted(k for k in changed - SUPPORTED - _BOOKKEEPING
                         if not _unchanged(k, getattr(config, k), getattr(GenerationConfig(), k, None)))
    if unsupported:
        raise ValueError(f"generate(): {', '.join(f'{k}={getattr(config, k)!r}' for k in unsupported)} is not "
                         f"supported by the Cognica reference model (supported: {', '.join(sorted(SUPPORTED))})")
    return config


def _processors(config: Any) -> Any:
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            procs.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            procs.append(TopPLogitsWarper(config.top_p))
    return procs


@torch.inference_mode()
def generate(gpt: Any, input_ids: torch.Tensor, default_config: Any = None, attention_mask: torch.Tensor | None = None,
             **kwargs: Any) -> torch.Tensor:
    """[B, T] prompt ids -> [B, T + new] ids, as transformers' `generate` returns them."""
    config = _merged_config(default_config, kwargs)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate() needs input_ids of shape [batch, length >= 1], got {list(input_ids.shape)}")
    prompt_len = input_ids.shape[1]
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    eos = config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    procs = _processors(config)

    def pick(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = procs(ids, logits.float())
        return torch.multinomial(torch.softmax(scores, dim=-1), 1)[:, 0] if config.do_sample else scores.argmax(-1)

    return decode(gpt, input_ids, max_new, pick, eos, pad, attention_mask)


def decode(gpt: Any, input_ids: torch.Tensor, max_new: int,
           pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], stop_ids: torch.Tensor,
           pad: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The KV-cache decoding loop of the reference model (`CognicaGPT.generate` and `generate` above): [B, T]
    prompt ids (left-padded where `attention_mask` is 0) -> [B, T + new] ids; `pick(ids so far, last logits)`
    chooses each next token; a row that produced a stop id is padded with `pad` from then on, and the loop ends when
    every row has stopped. `gpt` is a `cognica.model.CognicaLayout` (the reference or the transformers class)."""
    ids = input_ids.to(gpt.lm_head.weight.device)
    cache = KVCache.empty(gpt.arch.n_active_layers)
    if attention_mask is not None:
        attention_mask = attention_mask.to(ids.device)
        if not bool(attention_mask[:, -1].bool().all()):
            raise ValueError("generate(): a prompt ends in padding (attention_mask 0 in the last column); pad on "
                             "the left for generation (tokenizer.padding_side = 'left')")
        if bool(attention_mask.bool().all()):
            attention_mask = None
    logits = gpt.forward_logits(ids, cache, attention_mask)[:, -1]
    stop_ids = stop_ids.to(ids.device)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step in range(max(max_new, 0)):
        nxt = torch.where(done, torch.full_like(done, pad, dtype=ids.dtype), pick(ids, logits))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, stop_ids)
        if bool(done.all()) or step == max_new - 1:
            break
        logits = gpt.forward_logits(nxt[:, None], cache)[:, -1]
    return ids
