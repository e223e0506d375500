# SPDX-License-Identifier: Apache-2.0
"""The CPU linear pass on vLLM: bf16 linears on a CPU without bf16 matrix instructions take an fp32 weight copy.

vLLM's CPU linears call `layer.cpu_linear` (set by `dispatch_cpu_unquantized_gemm` in
vllm/model_executor/layers/utils.py, per layer, after loading); on such a CPU that is torch's generic bf16 GEMM
(~6x slower than fp32 MKL there). `use_upcast_linear` points it at `cognica_kernels.cpu_linear.UpcastLinear`.
Layers vLLM gave a packed kernel (oneDNN, zentorch, sgl) keep it: those remove `weight`.
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from cognica_kernels.cpu_linear import UpcastLinear, upcast_summary, upcast_wanted

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's log handler prints it


def use_upcast_linear(model: nn.Module) -> int:
    """Switch every eligible linear layer (and lm_head) of `model`; returns how many were switched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    switched, extra, dtype = 0, 0, None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (LinearBase, ParallelLMHead)) or not hasattr(module, "cpu_linear"):
            continue
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
            continue
        if not upcast_wanted(weight.dtype, weight.device):
            continue
        module.cpu_linear = UpcastLinear(weight)
        switched, dtype = switched + 1, weight.dtype
        extra += module.cpu_linear.extra_bytes
    if switched:
        logger.info(upcast_summary(switched, dtype, extra))
    return switched
