"""The CPU linear pass on SGLang: bf16 linears on a CPU without bf16 matrix instructions take an fp32 weight copy.

SGLang's unquantized linears and lm_head run `UnquantizedLinearMethod.apply`, on such a CPU torch's generic bf16
GEMM (~6x slower than fp32 MKL there). `use_upcast_linear` gives them `UpcastLinearMethod`, whose GEMM is
`cognica_kernels.cpu_linear.UpcastLinear`. AMX-packed layers (`use_intel_amx_backend`) are left alone.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.layers.linear import LinearBase
from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead
from torch import nn

from cognica_kernels.cpu_linear import UpcastLinear, upcast_summary, upcast_wanted

logger = logging.getLogger(__name__)


class UpcastLinearMethod(UnquantizedLinearMethod):
    """SGLang's unquantized linear whose GEMM is `UpcastLinear` (an fp32 weight copy used from a few rows on)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = UpcastLinear(weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x, None, bias)


def use_upcast_linear(model: nn.Module) -> int:
    """Switch every eligible linear layer (and lm_head) of `model`, after every (re)load so that a copy always
    matches the loaded weight; returns how many were switched."""
    switched, extra, dtype = 0, 0, None
    for module in model.modules():
        method, weight = getattr(module, "quant_method", None), getattr(module, "weight", None)
        if not isinstance(module, (LinearBase, ParallelLMHead)) or getattr(module, "use_intel_amx_backend", False):
            continue
        if type(method) not in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod, UpcastLinearMethod):
            continue
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not upcast_wanted(weight.dtype, weight.device):
            continue
        module.quant_method = UpcastLinearMethod(weight)
        switched, dtype = switched + 1, weight.dtype
        extra += module.quant_method.linear.extra_bytes
    if switched:
        logger.info(upcast_summary(switched, dtype, extra))
    return switched
