"""SSSL attention through `cognica_kernels` on CUDA, inside SGLang's token pool.

The model keeps `RadixAttention` (it owns the layer's window and registers with SGLang's backends). On CUDA, with
`COGNICA_KERNELS=triton` (the default there), EXTEND batches (prefill and chunked prefill, which SGLang runs
outside CUDA graphs) go through `cognica_kernels.token_pool_attention` instead: K/V are written with the pool's
own `set_kv_buffer` (which translates to the sliding-window pool where the hybrid SWA pool is on), then the Triton
kernel reads the layer's buffer through `req_to_token` (translated to SWA slots for sliding layers), touching only
in-window keys. Decode batches stay on the backend's RadixAttention, whose CUDA-graph capture we do not replace;
on CPU RadixAttention always runs.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.model_executor.forward_batch_info import ForwardBatch

from cognica_kernels import engine_uses_triton


def use_triton_attention(is_cuda: bool, forward_batch: ForwardBatch) -> bool:
    return engine_uses_triton(is_cuda) and forward_batch.forward_mode.is_extend()


def triton_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: RadixAttention,
                            forward_batch: ForwardBatch) -> torch.Tensor:
    """q [tokens, heads * hd], k/v [tokens, kv_heads * hd] -> [tokens, heads * hd] for an extend batch."""
    from cognica_kernels import token_pool_attention

    hd = attn.head_dim
    q, k, v = q.view(-1, attn.tp_q_head_num, hd), k.view(-1, attn.tp_k_head_num, hd), v.view(-1, attn.tp_v_head_num, hd)
    pool = forward_batch.token_to_kv_pool
    pool.set_kv_buffer(attn, forward_batch.out_cache_loc, k, v)
    req_to_token = forward_batch.req_to_token_pool.req_to_token
    window = attn.sliding_window_size if attn.sliding_window_size is not None and attn.sliding_window_size >= 0 \
        else None
    if window is not None and hasattr(pool, "translate_loc_from_full_to_swa"):
        # the hybrid pool keeps sliding layers in their own, smaller buffer with its own slot numbering
        rows = req_to_token[forward_batch.req_pool_indices]
        req_to_token = pool.translate_loc_from_full_to_swa(rows.flatten().long()).view(rows.shape).to(rows.dtype)
        req_pool_indices = torch.arange(rows.shape[0], device=rows.device)
    else:
        req_pool_indices = forward_batch.req_pool_indices
    out = token_pool_attention(q, pool.get_key_buffer(attn.layer_id), pool.get_value_buffer(attn.layer_id),
                               req_to_token, req_pool_indices, forward_batch.seq_lens, forward_batch.extend_seq_lens,
                               attn.scaling, window)
    return out.flatten(-2)
