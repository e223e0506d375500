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
run. The op is opaque to Dynamo and is added to the splitting ops ("vllm::cognica_smear_prev_ids"), so under CUDA
piecewise graphs it runs eagerly every step with that step's metadata. It writes into an output the caller allocated
inside the compiled graph (`mutates_args`, as vLLM's `unified_attention_with_output`): a piecewise graph replays with
the input addresses it captured and copies nothing (`CUDAGraphWrapper.__call__` in vllm/compilation/cuda_graph.py), so a
fresh tensor returned by an eager op would never be seen.

CUDA graphs also pad the batch (FULL decode graphs pad the request count): padded tokens have slot -1 and sit at or
after `query_start_loc[-1]`, which repeats the last real offset; they are masked and their indices clamped, so
the op reads and writes nothing of theirs (see `record_and_read`).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.utils.torch_utils import direct_register_custom_op

from cognica_vllm.forward_context import cache_block_size, layer_cache, layer_metadata, op_name, split_graph_at

OP_NAME = op_name("cognica_smear_prev_ids")


class SmearState(nn.Module):
    """Owns the slot -> token id buffer; found by the op through vLLM's static forward context."""

    def __init__(self, vllm_config: VllmConfig, attn_layer_name: str, prefix: str):
        super().__init__()
        self.name = prefix
        self.attn_layer_name = attn_layer_name
        self.slot_ids: torch.Tensor | None = None  # [num_slots + 1]; the last entry is padding scratch
        compilation = vllm_config.compilation_config
        if prefix in compilation.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation.static_forward_context[prefix] = self
        split_graph_at(vllm_config, OP_NAME)

    def previous(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Record this step's token ids at their KV slots and return, per token, the previous token id of its
        sequence (0 where there is none) and whether there is one ([T, 1] bool): what `layers.smear` takes."""
        prev = smear_prev_ids(input_ids, positions, self.name)
        return prev.clamp(min=0), (prev >= 0).unsqueeze(-1)

    def buffer(self, num_slots: int, device: torch.device) -> torch.Tensor:
        """The buffer, sized from the bound KV cache of the full-attention layer on first use (a warm-up or
        profiling run with metadata, which vLLM runs eagerly before it captures a graph)."""
        if self.slot_ids is None or self.slot_ids.numel() != num_slots + 1:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                # a fill captured in a graph would wipe the buffer at every replay
                raise RuntimeError("cognica smear: the slot-token buffer must exist before CUDA graph capture")
            self.slot_ids = torch.full((num_slots + 1,), -1, dtype=torch.int32, device=device)
        return self.slot_ids


def record_and_read(out: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, slot_ids: torch.Tensor,
                    block_size: int, block_table: torch.Tensor, query_start_loc: torch.Tensor,
                    slot_mapping: torch.Tensor, num_tokens: int) -> None:
    """Write this step's token ids at their KV slots, then `out[i]` = the id at the slot of position p-1 of token
    i's sequence (-1 at position 0 and for padding). No host sync, no data-dependent shapes: graph-capturable.

    Padding (CUDA graphs): tokens from `query_start_loc[-1]` on are padding (vLLM fills the padded tail of
    `query_start_loc` with the last real offset: V1's `GPUModelRunner._prepare_inputs` in 0.32's
    vllm/v1/worker/gpu_model_runner.py, V2's `GPUModelRunner.prepare_inputs` in vllm/v1/worker/gpu/model_runner.py)
    and have slot -1
    (`GPUModelRunner._get_slot_mappings`); `num_tokens` may count them (FULL graphs pass the padded count,
    `GPUModelRunner._build_attention_metadata`). Their request index would be one past the block table, so it is
    clamped, and they neither write nor read.
    """
    n = num_tokens
    scratch = slot_ids.numel() - 1
    token = torch.arange(n, device=input_ids.device)
    real = token < query_start_loc[-1].long()
    write = slot_mapping[:n].long()
    slot_ids[torch.where(real & (write >= 0), write, scratch)] = input_ids[:n].to(torch.int32)
    # slot of position p-1 of the same sequence, through the full layer's block table
    pos = positions[:n].long()
    req = torch.searchsorted(query_start_loc[1:].long(), token, right=True).clamp(max=block_table.shape[0] - 1)
    p = (pos - 1).clamp(min=0)
    block = block_table[req, (p // block_size).clamp(max=block_table.shape[1] - 1)].long()
    has_prev = real & (pos > 0)
    prev_slot = torch.where(has_prev, block * block_size + p % block_size, scratch).clamp(0, scratch)
    out[:n] = torch.where(has_prev, slot_ids[prev_slot].to(out.dtype), -1)
    out[n:] = -1


def smear_prev_ids_impl(input_ids: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, state_name: str) -> None:
    ctx = get_forward_context()
    state: SmearState = ctx.no_compile_layers[state_name]
    meta = layer_metadata(ctx.attn_metadata, state.attn_layer_name)
    if meta is None:  # profiling / dummy run: no KV cache yet, nothing to remember
        out.fill_(-1)
        return
    attn, kv_cache, slot_mapping = layer_cache(ctx, state.attn_layer_name, meta)
    if kv_cache.numel() == 0:
        out.fill_(-1)
        return
    num_slots, block_size = cache_block_size(kv_cache, attn.num_kv_heads, attn.head_size)
    record_and_read(out, input_ids, positions, state.buffer(num_slots, kv_cache.device), block_size,
                    meta.block_table, meta.query_start_loc, slot_mapping, meta.num_actual_tokens)


def smear_prev_ids_fake(input_ids: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, state_name: str) -> None:
    return None


direct_register_custom_op(
    op_name="cognica_smear_prev_ids",
    op_func=smear_prev_ids_impl,
    fake_impl=smear_prev_ids_fake,
    mutates_args=["out"],
)


def smear_prev_ids(input_ids: torch.Tensor, positions: torch.Tensor, state_name: str) -> torch.Tensor:
    """Previous token id of each token's sequence (-1 at position 0 and for padding)."""
    out = torch.empty_like(input_ids)
    torch.ops.vllm.cognica_smear_prev_ids(input_ids, positions, out, state_name)
    return out
