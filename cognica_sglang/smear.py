"""Smear state on SGLang's own KV bookkeeping: one int32 "token id per KV slot" buffer.

Smear mixes in the previous token of the same sequence, but a forward only sees this step's
tokens. SGLang already maps every position of every request to a KV slot (`req_to_token`), and
that mapping is what keeps chunked prefill, radix prefix hits, retraction and mixed batches
correct. So each forward writes its tokens' ids at their slots (`forward_batch.out_cache_loc`),
then reads, for every token at position p >= 1, the id stored at the slot of position p - 1.
The state lives and dies with the KV slots the engine manages, shared prefixes included, and
there is no table keyed by request (see shared/spec/engines.md, "Smear state").

Slots are in the full pool's index space: with the hybrid SWA pool a freed sliding slot leaves
its full slot allocated, so the predecessor read stays valid. Modes that fill KV slots without
a forward through this model (hierarchical cache reload, P/D disaggregation, speculative
decoding, translated/unified KV ids) would leave stale ids and are refused.
"""

from __future__ import annotations

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool

NO_TOKEN = -1  # a slot no forward of this model has written


def unsupported_modes(server_args) -> list[str]:
    """The server settings under which KV slots get filled without our forward (stale smear ids):
    `cognica.serving.ServingSettings.foreign_kv`, refused in the first process (`cognica_sglang.config_checks`)."""
    get = lambda name, default=None: getattr(server_args, name, default)
    found = []
    if get("enable_hierarchical_cache"):
        found.append("--enable-hierarchical-cache (KV reloaded from host memory)")
    for flag in ("enable_lmcache", "enable_flexkv", "enable_unified_cache_external_linker"):
        if get(flag):
            found.append(f"--{flag.replace('_', '-')} (KV loaded from an external cache)")
    if get("hicache_storage_backend"):
        found.append("--hicache-storage-backend (KV loaded from storage)")
    if get("disaggregation_mode", "null") not in (None, "null"):
        found.append(f"--disaggregation-mode {get('disaggregation_mode')} (KV transferred between instances)")
    if get("speculative_algorithm"):
        found.append(f"--speculative-algorithm {get('speculative_algorithm')} (draft tokens written by another model)")
    if get("enable_unified_memory"):
        found.append("--enable-unified-memory (translated KV ids)")
    return found


def full_pool_slots(pool) -> int:
    """Slots of the full-attention pool, the index space of `out_cache_loc` and `req_to_token`.

    Not `pool.get_kv_buffer_shape()`: for the hybrid SWA pool that reads the buffer of layer `start_layer`
    (`KVCache.get_kv_buffer_shape` in sglang/srt/mem_cache/memory_pool.py), a sliding layer in SSSL, i.e. the
    smaller SWA sub-pool (`SWAKVPool.layers_mapping`, built in `SWAKVPool.__init__` and read by
    `SWAKVPool.get_key_buffer` / `get_value_buffer` in sglang/srt/mem_cache/swa_memory_pool.py).
    """
    full = getattr(pool, "full_kv_pool", pool)
    return full.get_key_buffer(full.start_layer).shape[0]


class SlotTokens:
    """The token id held by every KV slot of the full pool, plus one scratch entry."""

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self.ids is None:
            # Allocated on the first forward, when the pool exists: graph capture must not be the first.
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("cognica smear: the slot-token buffer must exist before CUDA graph capture")
            num_slots = full_pool_slots(get_token_to_kv_pool())
            self.ids = torch.full((num_slots + 1,), NO_TOKEN, dtype=torch.int32, device=device)
        return self.ids

    def previous(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record this step's tokens at their slots and return, per token, the previous token id of
        its sequence (0 where there is none) and a [T, 1] mask that is 1 where it exists."""
        ids = self._buffer(input_ids.device)
        if forward_batch.out_cache_loc_virtual is not None:
            raise RuntimeError("cognica smear: translated (virtual/physical) KV ids are not supported")
        ids[forward_batch.out_cache_loc] = input_ids.to(torch.int32)

        if forward_batch.forward_mode.is_decode():
            req_of_token = forward_batch.req_pool_indices  # one token per request
        else:  # extend / mixed: extend_seq_lens counts every request's new tokens, decodes as 1
            req_of_token = torch.repeat_interleave(
                forward_batch.req_pool_indices, forward_batch.extend_seq_lens, output_size=input_ids.shape[0]
            )
        req_to_token = get_req_to_token_pool().req_to_token
        prev_pos = (positions - 1).clamp(min=0)
        prev_slot = req_to_token[req_of_token.long(), prev_pos.long()]
        prev_ids = ids[prev_slot.long()].long()
        has_prev = (positions > 0) & (prev_ids != NO_TOKEN)
        return prev_ids.clamp(min=0), has_prev.unsqueeze(-1)
