"""relu(x)^2 for the MLP: a fused elementwise kernel between `mlp.c_fc` and `mlp.c_proj`.

Layout: x of any shape, any float dtype (bf16 in the model); output the same shape and dtype. Math in fp32, one
read, one write, rounded once.

The public entry runs Triton on CUDA tensors and the plain-torch reference everywhere else (the CPU serving path:
the Triton interpreter is far too slow to serve and crashed under torch.compile, see engines.md). The MLP's GEMMs
stay the engines' own linear layers.
"""

from __future__ import annotations

import torch

from .utils import HAS_TRITON, tl, triton, uses_triton


@triton.jit
def _relu2_kernel(x_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # int64: no overflow
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(x, 0.0)
    tl.store(y_ptr + offsets, (r * r).to(y_ptr.dtype.element_ty), mask=mask)  # relu(x)^2


def relu2_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch the elementwise relu^2 kernel (CUDA tensors, or CPU tensors under the interpreter)."""
    assert HAS_TRITON, "relu2_triton needs triton"
    x_flat = x.contiguous().view(-1)
    y = torch.empty_like(x_flat)
    n = x_flat.numel()
    BLOCK_SIZE = 1024  # not tuned; 1024 bf16 = 2 KiB per program is the usual elementwise tile
    _relu2_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x_flat, y, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=4)
    return y.view(x.shape)


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 in plain torch, in x's dtype: the model's own formula (`cognica.layers.relu2`, bit for bit; a test
    holds them equal), which the CPU paths of both plugins run. The Triton kernel computes in fp32 and rounds once."""
    return torch.relu(x).square()


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2: Triton on CUDA, the torch reference elsewhere."""
    return relu2_triton(x) if uses_triton(x) else relu2_reference(x)

