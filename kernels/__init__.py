"""Triton kernels for the Cognica (nanochat) GPT: the relu^2 MLP and SSSL sliding-window paged attention.

Each op has one public entry that runs Triton on CUDA tensors and its plain-torch reference elsewhere
(`uses_triton` says which). This package imports only torch and triton. The elementwise `relu2` is reached
as `cognica_kernels.relu2.relu2`: exporting it here would shadow its module.
"""

import os

from .attention import (
    block_table_from_req_to_token,
    paged_attention,
    paged_attention_reference,
    token_pool_attention,
    token_pool_decode_attention,
)
from .relu2 import HAS_TRITON, relu2_linear, relu2_linear_reference, relu2_reference, uses_triton

KERNELS_ENV = "COGNICA_KERNELS"  # "triton" (default: used where CUDA is) or "engine" (the engines' built-ins)


def engine_uses_triton(is_cuda: bool) -> bool:
    """The plugins' one switch: run this package's Triton kernels when the engine runs on CUDA, unless
    COGNICA_KERNELS=engine selects the engine's own ops. On CPU the plugins always use plain torch ops."""
    choice = os.environ.get(KERNELS_ENV, "triton")
    if choice not in ("triton", "engine"):
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected 'triton' or 'engine'")
    return is_cuda and choice == "triton" and HAS_TRITON


__all__ = [
    "HAS_TRITON",
    "KERNELS_ENV",
    "engine_uses_triton",
    "block_table_from_req_to_token",
    "paged_attention",
    "paged_attention_reference",
    "relu2_linear",
    "relu2_linear_reference",
    "relu2_reference",
    "token_pool_attention",
    "token_pool_decode_attention",
    "uses_triton",
]
