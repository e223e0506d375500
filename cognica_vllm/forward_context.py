# SPDX-License-Identifier: Apache-2.0
"""What the plugin's custom ops read from vLLM's forward context, and how they split the compiled graph.

Used by the smear op (`cognica_vllm.smear`) and the Triton attention op (`cognica_vllm.attention`): both are
opaque to torch.compile and must run eagerly with each step's metadata, so both are splitting ops.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.config import VllmConfig


def op_name(name: str) -> str:
    """The name vLLM's splitting rule matches: `OpOverload.name()`, i.e. "namespace::name".

    `should_split` (vllm/compilation/partition_rules.py) compares `splitting_ops` entries with `target.name()` /
    `_qualified_op_name`, the form of the built-in list (`CompilationConfig` in vllm/config/compilation.py,
    "vllm::unified_attention_with_output"); "vllm.name" never matches.
    """
    return f"vllm::{name}"


def split_graph_at(vllm_config: VllmConfig, name: str) -> None:
    """Make `name` ("vllm::op") a splitting op: under piecewise CUDA graphs it then runs eagerly with each
    step's metadata instead of being captured with the capture run's (vLLM's `split_graph` in
    vllm/compilation/backends.py). `splitting_ops` is None only outside VLLM_COMPILE."""
    assert "::" in name, f"splitting ops are matched as 'namespace::name', got {name!r}"
    ops = vllm_config.compilation_config.splitting_ops
    if ops is not None and name not in ops:
        ops.append(name)


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


def cache_block_size(kv_cache: torch.Tensor, num_kv_heads: int, head_size: int) -> tuple[int, int]:
    """(KV slots, tokens per block) of a bound cache `[num_blocks, num_kv_heads, block_size, 2 * head_size]` (the CPU,
    FLASH_ATTN and, in vLLM 0.34, TRITON_ATTN layout: `CPUAttentionBackendImpl.forward` in
    vllm/v1/attention/backends/cpu_attn.py, `FlashAttentionImpl.do_kv_cache_update` in
    vllm/v1/attention/backends/flash_attn.py, `TritonAttentionImpl._ensure_scale_caches` in triton_attn.py). The
    block tables index the cache's own (kernel) blocks, which can be smaller than `cache_config.block_size` when vLLM
    splits a manager block into kernel blocks."""
    num_slots = kv_cache.numel() // (2 * num_kv_heads * head_size)
    return num_slots, num_slots // kv_cache.shape[0]
