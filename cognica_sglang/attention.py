"""SSSL attention through `cognica_kernels` on CUDA, inside SGLang's token pool.

The model keeps `RadixAttention` (it owns the layer's window and registers with SGLang's backends), and by default
SGLang's backend runs on CUDA (its triton / flashinfer / fa3 backends already skip out-of-window keys). On CUDA,
with `COGNICA_KERNELS=triton` (or `attention=triton`; cognica_kernels.dispatch), EXTEND batches (prefill and chunked
prefill, which SGLang runs outside CUDA graphs) go through `cognica_kernels.token_pool_attention` instead: K/V are
written with the pool's own `set_kv_buffer` (which translates to the sliding-window pool where the hybrid SWA pool
is on), then the Triton kernel reads the layer's buffer through `req_to_token` (translated to SWA slots for the
layers the pool keeps in its SWA sub-pool), touching only in-window keys. Decode batches stay on the backend's
RadixAttention, whose CUDA-graph capture we do not replace. The Triton extend path is eager only: inside a prefill
CUDA graph (breakable or full; SGLang enables them only for a model with a `layers` attribute,
`capture_prefill_graph` in sglang/srt/model_executor/model_runner_components/cuda_graph_setup.py) the layer takes
RadixAttention, whose own `_eager_attention` is the graph break (`RadixAttention.forward` in
sglang/srt/layers/radix_attention.py).

On CPU, DECODE batches go through `cognica_kernels.token_pool_decode_attention` (plain torch, the whole batch in
one gather of the in-window keys) instead of the torch_native backend's loop over the requests, which cost 14%
of a 16-sequence decode step of the 1.38B model (py-spy, 2026-11-25); 16 x 96 decode steps took 71.9 s
against 82.4 s with COGNICA_KERNELS=engine. Extend batches stay on RadixAttention.
`COGNICA_KERNELS=engine` (or `attention=engine`) keeps the engine's attention everywhere. Both paths of ours
read the pool as the model's dtype: where SGLang stores the KV cache in another one (`--kv-cache-dtype fp8`),
the layer falls back to RadixAttention, logged once.
"""

from __future__ import annotations

import functools
import logging

import torch
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool
from sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph import is_in_breakable_cuda_graph
from sglang.srt.model_executor.runner_utils.prefill_graph import is_in_prefill_graph_scope

from cognica.config import CognicaConfig
from cognica.serving import served_window_left
from cognica_kernels import kernel_setting, use_triton

logger = logging.getLogger(__name__)


def use_triton_attention(is_cuda: bool, forward_batch: ForwardBatch) -> bool:
    """Extend batches on CUDA where COGNICA_KERNELS chooses our kernel (cognica_kernels.dispatch; SGLang's backend
    by default), run eagerly: never inside a prefill CUDA graph being captured or replayed."""
    if is_in_prefill_graph_scope() or is_in_breakable_cuda_graph() or not forward_batch.forward_mode.is_extend():
        return False
    return use_triton("attention", is_cuda, logger)


def use_cpu_decode_attention(is_cuda: bool, forward_batch: ForwardBatch) -> bool:
    """Batched torch decode attention: on CPU decode batches unless COGNICA_KERNELS selects the engine's
    attention (`engine` or `attention=engine`)."""
    if is_cuda or not forward_batch.forward_mode.is_decode():
        return False
    return kernel_setting("attention") != "engine"


@functools.cache
def _log_quantized_kv(kv_dtype: torch.dtype, dtype: torch.dtype) -> None:
    logger.info("cognica: the KV cache is stored as %s, not the model's %s: using SGLang's attention backend instead "
                "of cognica_kernels' attention", kv_dtype, dtype)


def _kv_in_model_dtype(attn: RadixAttention, dtype: torch.dtype) -> bool:
    """Whether this layer's pool holds K/V as `dtype`, unscaled: what our kernels read. Checked before anything
    is written, so that RadixAttention, which then runs, stores this step's K/V itself (and only once)."""
    kv_dtype = get_token_to_kv_pool().get_key_buffer(attn.layer_id).dtype
    if kv_dtype == dtype and getattr(attn, "k_scale", None) is None:
        return True
    _log_quantized_kv(kv_dtype, dtype)
    return False


# SGLang 0.5.23 decode backends that read `get_attention_sliding_window_size()` keys COUNTING THE QUERY: the triton
# backend's decode gathers min(seq_lens, size) keys (`update_sliding_window_buffer` in
# sglang/srt/layers/attention/triton_backend.py, eager and CUDA-graph decode alike), and `seq_lens` already counts the
# token being decoded, while its extend kernel keeps the layer's `sliding_window_size` keys before the query
# (`q <= k + W` in sglang/kernels/ops/attention/extend_attention.py). Given W, decode would see W - 1 keys before the
# query from position W on: wrong tokens (tests/sglang_gpu_path/test_gpu_path.py). Given W + 1, decode sees the W it
# needs, and the extend kernel's mask (relative to the window buffer's start) drops the one extra prefix key it then
# gathers.
# flashinfer (`clamp(seq_lens, max=size + 1)`) and fa3 (`window_size=(layer.sliding_window_size, 0)`) count right.
DECODE_WINDOW_COUNTS_QUERY = frozenset({"triton"})


# SGLang 0.5.23 backends that would give wrong tokens on the sliding layers, whatever the model reports (read, not
# run: no GPU here): refused at start by `check_attention_backends`.
WRONG_WINDOW_BACKENDS = {
    "aiter": "its unified attention keeps the layer's window counting the query (`window_size=(sliding_window_size - 1,"
             " 0)` in AiterAttnBackend), one key short in decode and extend",
    "flex_attention": "it applies no sliding window (TorchFlexAttnBackend masks causally only) and cannot write the "
                      "SWA pool",
    "wave": "it applies no sliding window (WaveAttnBackend) and cannot write the SWA pool",
}


def check_attention_backends(backends: tuple) -> None:
    """Refuse, with one line, an attention backend that computes the S layers' windows wrongly (WRONG_WINDOW_BACKENDS),
    naming the ones that are right."""
    for backend in dict.fromkeys(b for b in backends if b in WRONG_WINDOW_BACKENDS):
        raise ValueError(f"cognica: SGLang's {backend!r} attention backend would give wrong tokens on this model's "
                         f"sliding-window layers: {WRONG_WINDOW_BACKENDS[backend]}; use --attention-backend triton "
                         "(NVIDIA and AMD; exact, tested), fa3 or flashinfer (NVIDIA)")


def sliding_window_size(cfg: CognicaConfig, layer: int, context_len: int) -> int:
    """`RadixAttention.sliding_window_size` of `layer`: `cognica.serving.served_window_left` (keys before the query),
    -1 = full. A layer the hybrid SWA pool holds as sliding (`cognica.hf` sets `hybrid_layer_pattern` from
    `cfg.is_sliding`, before the served context is known) keeps its window even where it covers the whole context,
    which attends to the same keys: SGLang's backends read a layer through the SWA sub-pool's slots when its
    `sliding_window_size > -1` (the window rail of `TritonAttnBackend.forward_decode`), so the two must agree."""
    served = served_window_left(cfg, layer, context_len)
    if served is None:
        return cfg.window_left[layer] if cfg.is_sliding[layer] else -1
    return served


def engine_window_size(keys_before_query: int, decode_backend: str | None = None) -> int:
    """What the model reports as `get_attention_sliding_window_size()` for a window of `keys_before_query` keys before
    the query: one more where SGLang's decode backend counts the query among them (DECODE_WINDOW_COUNTS_QUERY). The
    extra key only makes SGLang keep one more sliding-window slot per request; the layers' own window (their
    `RadixAttention.sliding_window_size`) stays `keys_before_query`. `decode_backend`: the resolved decode attention
    backend (default: this process's, `sglang.srt.runtime_context.attention_backends`)."""
    if decode_backend is None:
        from sglang.srt.runtime_context import attention_backends

        decode_backend = attention_backends()[1]
    return keys_before_query + 1 if decode_backend in DECODE_WINDOW_COUNTS_QUERY else keys_before_query


def _window(attn: RadixAttention) -> int | None:
    size = attn.sliding_window_size
    return size if size is not None and size >= 0 else None


def in_swa_pool(pool, layer_id: int) -> bool:
    """Whether the hybrid SWA pool keeps this layer in its SWA sub-pool, by the pool's own layer mapping
    (`SWAKVPool.layers_mapping`, built in `SWAKVPool.__init__` in sglang/srt/mem_cache/swa_memory_pool.py): not "has a
    window", which an L layer also has once the served context exceeds its window while it stays in the full pool."""
    mapping = getattr(pool, "layers_mapping", None)
    return mapping is not None and hasattr(pool, "translate_loc_from_full_to_swa") and mapping[layer_id][1]


def _slot_rows(attn: RadixAttention, forward_batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(req_to_token, req_pool_indices) addressing this layer's KV buffer: a layer in the hybrid pool's SWA
    sub-pool has its own, smaller buffer with its own slot numbering, so its rows are translated."""
    pool = get_token_to_kv_pool()
    req_to_token = get_req_to_token_pool().req_to_token
    if in_swa_pool(pool, attn.layer_id):
        rows = req_to_token[forward_batch.req_pool_indices]
        translated = pool.translate_loc_from_full_to_swa(rows.flatten().long()).view(rows.shape).to(rows.dtype)
        return translated, torch.arange(rows.shape[0], device=rows.device)
    return req_to_token, forward_batch.req_pool_indices


def _write_kv(attn: RadixAttention, forward_batch: ForwardBatch, k: torch.Tensor, v: torch.Tensor):
    """Store this step's K/V as SGLang's own backends do (`KVWriteLoc`: the hybrid SWA pool also takes the
    sliding-pool slots); returns the pool."""
    pool = get_token_to_kv_pool()
    loc = forward_batch.out_cache_loc
    swa_loc = pool.translate_loc_from_full_to_swa(loc) if hasattr(pool, "translate_loc_from_full_to_swa") else None
    pool.set_kv_buffer(attn, KVWriteLoc(loc, swa_loc), k, v)
    return pool


def _store_and_address(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: RadixAttention,
                       forward_batch: ForwardBatch):
    """Heads split out, this step's K/V stored; returns (q, layer's K buffer, V buffer, req_to_token,
    req_pool_indices) for the kernels."""
    hd = attn.head_dim
    q, k, v = q.view(-1, attn.tp_q_head_num, hd), k.view(-1, attn.tp_k_head_num, hd), v.view(-1, attn.tp_v_head_num, hd)
    pool = _write_kv(attn, forward_batch, k, v)
    req_to_token, req_pool_indices = _slot_rows(attn, forward_batch)
    return q, pool.get_key_buffer(attn.layer_id), pool.get_value_buffer(attn.layer_id), req_to_token, req_pool_indices


def cpu_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: RadixAttention,
                         forward_batch: ForwardBatch) -> torch.Tensor | None:
    """q [batch, heads * hd], k/v [batch, kv_heads * hd] -> [batch, heads * hd] for a decode batch; None where
    the KV cache is stored in another dtype (quantized KV): the caller then uses RadixAttention."""
    from cognica_kernels import token_pool_decode_attention

    if not _kv_in_model_dtype(attn, q.dtype):
        return None
    q, k_buf, v_buf, req_to_token, req_pool_indices = _store_and_address(q, k, v, attn, forward_batch)
    out = token_pool_decode_attention(q, k_buf, v_buf, req_to_token, req_pool_indices, forward_batch.seq_lens,
                                      attn.scaling, _window(attn))
    return out.flatten(-2)


def triton_extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: RadixAttention,
                            forward_batch: ForwardBatch) -> torch.Tensor:
    """q [tokens, heads * hd], k/v [tokens, kv_heads * hd] -> [tokens, heads * hd] for an extend batch; None where
    the KV cache is stored in another dtype (quantized KV): the caller then uses RadixAttention."""
    from cognica_kernels import token_pool_attention

    if not _kv_in_model_dtype(attn, q.dtype):
        return None
    q, k_buf, v_buf, req_to_token, req_pool_indices = _store_and_address(q, k, v, attn, forward_batch)
    lens_cpu = forward_batch.extend_seq_lens_cpu  # host-side: no device sync per layer for the launch grid
    out = token_pool_attention(q, k_buf, v_buf, req_to_token, req_pool_indices, forward_batch.seq_lens,
                               forward_batch.extend_seq_lens, attn.scaling, _window(attn),
                               max_query_len=max(lens_cpu) if lens_cpu else None)
    return out.flatten(-2)
