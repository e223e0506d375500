"""Triton kernels for the Cognica (nanochat) GPT: the relu^2 activation and SSSL sliding-window paged attention.

Each op has one public entry that runs Triton on CUDA tensors and its plain-torch reference elsewhere
(`uses_triton` says which). Whether the plugins call them at all is `dispatch.use_triton`'s choice
(`COGNICA_KERNELS`; on CUDA the engines' own paths by default). This package imports only torch and triton; what
the op modules share is in `cognica_kernels.utils`. The elementwise `relu2` is reached as
`cognica_kernels.relu2.relu2`: exporting it here would shadow its module.
"""

from .attention import paged_attention, paged_attention_reference
from .dispatch import KERNELS_ENV, KernelChoice, choose_kernel, kernel_setting, use_triton
from .relu2 import relu2_reference
from .token_pool import block_table_from_req_to_token, token_pool_attention, token_pool_decode_attention
from .utils import HAS_TRITON, uses_triton

__all__ = [
    "HAS_TRITON",
    "KERNELS_ENV",
    "KernelChoice",
    "choose_kernel",
    "kernel_setting",
    "block_table_from_req_to_token",
    "paged_attention",
    "paged_attention_reference",
    "relu2_reference",
    "token_pool_attention",
    "token_pool_decode_attention",
    "use_triton",
    "uses_triton",
]
