# SPDX-License-Identifier: Apache-2.0
"""Smear state on vLLM: the previous token id of every token, kept in the engine's own KV slots.

Smear mixes in the previous token of the SAME sequence, but vLLM hands the model only this step's
tokens. vLLM already maps every token of every sequence to a physical KV slot, and that mapping is
what makes prefix caching, chunked prefill, preemption/recompute and mixed batches correct. So we
keep one int32 "token id per KV slot" buffer beside the KV cache of one FULL-attention layer: each
forward writes its tokens' ids at their slots and reads, for every token, the id stored at the
slot of position p-1 (position 0: -1, no smear). The state lives and dies with KV blocks vLLM
already manages, shared prefix blocks included; there is no side table keyed by request id.

Why a full-attention layer: sliding-window groups free out-of-window blocks and their block tables
keep stale ids for old positions; a full layer's table is valid for every earlier position.

Why a custom op: inside `@support_torch_compile` code, Python branches on the forward context are
traced once (during warm-up, when there is no metadata) and frozen; the smear would silently never
run. The op is opaque to Dynamo (a fake impl gives its shape) and is added to the splitting ops, so
under CUDA piecewise graphs it runs eagerly every step with that step's metadata.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

OP_NAME = "vllm.cognica_smear_prev_ids"


class SmearState(nn.Module):
    """Owns the slot -> token id buffer; found by the op through vLLM's static forward context."""

    def __init__(self, vllm_config: VllmConfig, attn_layer_name: str, prefix: str):
        super().__init__()
        self.name = prefix
        self.attn_layer_name = attn_layer_name
        self.cache_config = vllm_config.cache_config  # block_size is final only once the cache exists
        self.slot_ids: torch.Tensor | None = None  # [num_slots + 1]; the last entry is padding scratch
        compilation = vllm_config.compilation_config
        if prefix in compilation.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation.static_forward_context[prefix] = self
        split_graph_at(vllm_config, OP_NAME)

    def buffer(self, kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> torch.Tensor:
        """The buffer, sized from the bound KV cache of the full-attention layer on first use."""
        num_slots = kv_cache.numel() // (2 * num_kv_heads * head_size)
        if self.slot_ids is None or self.slot_ids.numel() != num_slots + 1:
            self.slot_ids = torch.full((num_slots + 1,), -1, dtype=torch.int32, device=kv_cache.device)
        return self.slot_ids


def split_graph_at(vllm_config: VllmConfig, op_name: str) -> None:
    """Make `op_name` a splitting op: under piecewise CUDA graphs it then runs eagerly with each step's metadata."""
    ops = vllm_config.compilation_config.splitting_ops
    if ops is not None and op_name not in ops:
        ops.append(op_name)


def layer_metadata(attn_metadata, layer_name: str):
    """This step's attention metadata of one layer (None in profiling and dummy runs)."""
    if isinstance(attn_metadata, list):  # micro-batching / speculative decoding: [0] is the base model
        attn_metadata = attn_metadata[0] if attn_metadata else None
    if isinstance(attn_metadata, dict):
        return attn_metadata.get(layer_name)
    return attn_metadata


def layer_cache(ctx, layer_name: str, meta) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """One attention layer's module, bound KV cache and this step's slot mapping (the forward context's per-layer
    mapping where there is one, else the metadata's)."""
    attn = ctx.no_compile_layers[layer_name]
    kv_cache = attn.kv_cache[0] if isinstance(attn.kv_cache, (list, tuple)) else attn.kv_cache
    slot_mapping = ctx.slot_mapping.get(layer_name) if isinstance(ctx.slot_mapping, dict) else None
    return attn, kv_cache, meta.slot_mapping if slot_mapping is None else slot_mapping


def smear_prev_ids_impl(input_ids: torch.Tensor, positions: torch.Tensor, state_name: str) -> torch.Tensor:
    ctx = get_forward_context()
    prev = torch.full_like(input_ids, -1)
    state: SmearState = ctx.no_compile_layers[state_name]
    meta = layer_metadata(ctx.attn_metadata, state.attn_layer_name)
    if meta is None:  # profiling / dummy run: no KV cache yet, nothing to remember
        return prev
    attn, kv_cache, slot_mapping = layer_cache(ctx, state.attn_layer_name, meta)
    if kv_cache.numel() == 0:
        return prev
    slots = state.buffer(kv_cache, attn.num_kv_heads, attn.head_size)
    scratch = slots.numel() - 1
    n = meta.num_actual_tokens
    write = slot_mapping[:n].long()
    slots[torch.where(write < 0, scratch, write)] = input_ids[:n].to(torch.int32)
    # slot of position p-1 of the same sequence, through the full layer's block table
    pos = positions[:n].long()
    req = torch.searchsorted(meta.query_start_loc[1:].long(), torch.arange(n, device=pos.device), right=True)
    p = (pos - 1).clamp(min=0)
    bs = state.cache_config.block_size
    prev_slot = meta.block_table[req, p // bs].long() * bs + p % bs
    prev[:n] = torch.where(pos > 0, slots[prev_slot].to(prev.dtype), -1)
    return prev


def smear_prev_ids_fake(input_ids: torch.Tensor, positions: torch.Tensor, state_name: str) -> torch.Tensor:
    return torch.empty_like(input_ids)


direct_register_custom_op(
    op_name="cognica_smear_prev_ids",
    op_func=smear_prev_ids_impl,
    fake_impl=smear_prev_ids_fake,
    mutates_args=[],
)


def smear_prev_ids(input_ids: torch.Tensor, positions: torch.Tensor, state_name: str) -> torch.Tensor:
    """Previous token id of each token's sequence (-1 at position 0 and for padding)."""
    return torch.ops.vllm.cognica_smear_prev_ids(input_ids, positions, state_name)
