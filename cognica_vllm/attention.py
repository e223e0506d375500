# SPDX-License-Identifier: Apache-2.0
"""SSSL attention through `cognica_kernels` on CUDA, inside vLLM's paged KV cache.

The model keeps vLLM's `Attention` layer (it owns the KV-cache spec, so the hybrid manager still sizes and frees
each layer's blocks by its window). By default vLLM's attention runs (FLASH_ATTN already starts each S layer's
key loop at its window start). On CUDA with the FLASH_ATTN backend and `COGNICA_KERNELS=triton` (or
`attention=triton`; cognica_kernels.dispatch) the model calls `cognica_paged_attention` instead of
`Attention.forward`: the op writes this step's K/V through the backend's own `do_kv_cache_update`, then runs the
Triton kernel on the same cache through the layer's block table, touching only in-window blocks on S layers.
Elsewhere (the default, CPU, other backends, a KV cache stored in another dtype such as `--kv-cache-dtype fp8`)
vLLM's built-in attention runs.
Like vLLM's own attention op, this one is opaque to torch.compile and splits the graph
("vllm::cognica_paged_attention"), so it reads each step's metadata eagerly.

Under FULL CUDA graphs the op is captured: the kernel variant it launches must then not depend on the capture run's
metadata. vLLM 0.32's V1 runner warms each graph up with `max_seq_len` = the dummy query length (1 for decode) and
captures with `max_seq_len = max_model_len` (`GPUModelRunner._build_attention_metadata` and
`GPUModelRunner._dummy_run` in vllm/v1/worker/gpu_model_runner.py, a file 0.34 deleted), so the op sizes the split-K
factor from the static `max_model_len` instead, which holds whatever the runner passes: warm-up compiles the variant
that capture records. (Untested on a GPU, V1 and V2 alike.)
"""

from __future__ import annotations

import torch
from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.utils.torch_utils import direct_register_custom_op

from cognica_kernels import use_triton
from cognica_vllm.forward_context import layer_cache, layer_metadata, op_name, split_graph_at

logger = init_logger(f"vllm.{__name__}")

OP_NAME = op_name("cognica_paged_attention")
SUPPORTED_BACKENDS = ("FLASH_ATTN",)  # KV layout [num_blocks, num_kv_heads, block_size, 2 * head_size]


def use_cognica_attention(backend_name: str, is_cuda: bool, kv_cache_dtype: torch.dtype | None = None,
                          dtype: torch.dtype | None = None) -> bool:
    """The Triton path: chosen for this GPU (COGNICA_KERNELS, cognica_kernels.dispatch: vLLM's own attention by
    default), a backend whose cache layout we read, and a KV cache stored in the model's dtype (the kernel reads
    it as q's dtype; `Attention.kv_cache_torch_dtype` is fp8 under `--kv-cache-dtype fp8`)."""
    if not use_triton("attention", is_cuda, logger):
        return False
    if backend_name not in SUPPORTED_BACKENDS:
        logger.info("cognica: the Triton kernel does not read the %s backend's KV layout: using vLLM's attention",
                    backend_name)
        return False
    if kv_cache_dtype is not None and dtype is not None and kv_cache_dtype != dtype:
        logger.info("cognica: the KV cache is stored as %s, not the model's %s: using vLLM's %s attention instead "
                    "of the cognica_kernels Triton kernel", kv_cache_dtype, dtype, backend_name)
        return False
    return True


def kernel_lengths(meta, max_model_len: int) -> dict[str, int]:
    """The host-side lengths the kernel launch takes: the step's `max_query_len`, and the static `max_model_len`
    for `max_seq_len` so that the split-K variant is the same at warm-up, capture and replay (module docstring)."""
    return {"max_query_len": meta.max_query_len, "max_seq_len": max_model_len}


def register_splitting(vllm_config) -> None:
    split_graph_at(vllm_config, OP_NAME)


def cognica_paged_attention_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor,
                                 layer_name: str, window_left: int, max_model_len: int) -> None:
    from cognica_kernels.attention import paged_attention

    ctx = get_forward_context()
    meta = layer_metadata(ctx.attn_metadata, layer_name)
    if meta is None:  # profiling / dummy run
        output.zero_()
        return
    attn, kv_cache, slot_mapping = layer_cache(ctx, layer_name, meta)
    hd = attn.head_size
    q, k, v = q.view(-1, attn.num_heads, hd), k.view(-1, attn.num_kv_heads, hd), v.view(-1, attn.num_kv_heads, hd)
    attn.impl.do_kv_cache_update(attn, k, v, kv_cache, slot_mapping)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(hd, dim=-1)  # each [blocks, block_size, heads, hd]
    n = meta.num_actual_tokens
    out = paged_attention(q[:n], key_cache, value_cache, meta.block_table, meta.seq_lens, meta.query_start_loc,
                          attn.impl.scale, window_left if window_left >= 0 else None,
                          **kernel_lengths(meta, max_model_len))
    output[:n] = out.flatten(-2)


def cognica_paged_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, output: torch.Tensor,
                                 layer_name: str, window_left: int, max_model_len: int) -> None:
    return None


direct_register_custom_op(
    op_name="cognica_paged_attention",
    op_func=cognica_paged_attention_impl,
    fake_impl=cognica_paged_attention_fake,
    mutates_args=["output"],
)


def cognica_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_name: str,
                            window_left: int | None, max_model_len: int) -> torch.Tensor:
    """q [tokens, heads * hd], k/v [tokens, kv_heads * hd] -> [tokens, heads * hd]; window_left None = full."""
    out = torch.empty_like(q)
    torch.ops.vllm.cognica_paged_attention(q, k, v, out, layer_name, -1 if window_left is None else window_left,
                                           max_model_len)
    return out
