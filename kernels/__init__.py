"""Triton kernels for the Cognica (nanochat) GPT: the relu^2 MLP and SSSL sliding-window paged attention.

Each op has one public entry that runs Triton on CUDA tensors and its plain-torch reference elsewhere
(`uses_triton` says which). This package imports only torch and triton. The elementwise `relu2` is reached
as `cognica_kernels.relu2.relu2`: exporting it here would shadow its module.
"""

from .attention import (
    block_table_from_req_to_token,
    paged_attention,
    paged_attention_reference,
    token_pool_attention,
)
from .relu2 import HAS_TRITON, relu2_linear, relu2_linear_reference, relu2_reference, uses_triton

__all__ = [
    "HAS_TRITON",
    "block_table_from_req_to_token",
    "paged_attention",
    "paged_attention_reference",
    "relu2_linear",
    "relu2_linear_reference",
    "relu2_reference",
    "token_pool_attention",
    "uses_triton",
]
