"""relu(x)^2 for the MLP: a fused elementwise kernel and a GEMM with relu^2 in its epilogue.

Layouts (all row-major, any float dtype; bf16 in the model):
- `relu2(x)`: x of any shape, output the same shape and dtype. Math in fp32, one read, one write.
- `relu2_linear(x, w)`: x `[M, K]` (or `[..., K]`), w `[N, K]` like an `nn.Linear` weight (no bias: the model
  has none). Output `relu(x @ w.T)^2`, `[..., N]`, dtype of x, accumulated in fp32 and rounded once. This is
  `mlp.c_fc` plus the activation, so the `[M, 6144]` pre-activation never goes to memory.

Each public entry runs Triton on CUDA tensors and the plain-torch reference everywhere else (the CPU serving
path: the Triton interpreter is far too slow to serve and crashed under torch.compile, see engines.md). The
references round like the model: `relu2_linear_reference` rounds the matmul to x's dtype before squaring,
the Triton GEMM rounds once at the end, so in bf16 the two differ by up to ~2 ulp.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a CPU-only torch without triton: the references below still serve
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False


@triton.jit
def _relu2_kernel(x_ptr, y_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)  # int64: no overflow
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    r = tl.maximum(x, 0.0)
    tl.store(y_ptr + offsets, (r * r).to(y_ptr.dtype.element_ty), mask=mask)  # relu(x)^2


@triton.jit
def _relu2_linear_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each column tile of w while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_rows
    pid_n = (pid % group_size) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk  # w.T tile [K, N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k + k0 < K
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & (offs_n[None, :] < N), other=0.0)
        if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong (engines.md): multiply in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    r = tl.maximum(acc, 0.0)  # epilogue: relu(x @ w.T)^2 in fp32, rounded once on store
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, (r * r).to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 for fp32 runs (the parity runs), tf32 (the default) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _gemm_settings(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an M-row relu2 GEMM.

    Not tuned: no GPU has run this kernel yet. Small M (decode) gets 16-row tiles so a batch-1 step does not
    compute 128 rows of padding; large M gets the usual 128x128x64 Ampere/Hopper tile.
    """
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 64:
        return 64, 128, 64, 4, 4
    return 128, 128, 64, 8, 3


def relu2_triton(x: torch.Tensor) -> torch.Tensor:
    """Launch the elementwise relu^2 kernel (CUDA tensors, or CPU tensors under the interpreter)."""
    assert HAS_TRITON, "relu2_triton needs triton"
    x_flat = x.contiguous().view(-1)
    y = torch.empty_like(x_flat)
    n = x_flat.numel()
    BLOCK_SIZE = 1024  # not tuned; 1024 bf16 = 2 KiB per program is the usual elementwise tile
    _relu2_kernel[(triton.cdiv(n, BLOCK_SIZE),)](x_flat, y, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=4)
    return y.view(x.shape)


def relu2_linear_triton(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Launch the relu^2 GEMM: relu(x @ w.T)^2 with x `[..., K]`, w `[N, K]`."""
    assert HAS_TRITON, "relu2_linear_triton needs triton"
    assert w.dim() == 2, f"w must be [N, K], got shape {tuple(w.shape)}"
    assert x.shape[-1] == w.shape[1], f"x has K={x.shape[-1]} but w is {tuple(w.shape)}"
    assert x.dtype == w.dtype, f"x is {x.dtype} but w is {w.dtype}"
    x2 = x.reshape(-1, x.shape[-1])
    M, K = x2.shape
    N = w.shape[0]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages = _gemm_settings(M)
    grid = (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)
    _relu2_linear_kernel[grid](
        x2, w, y, M, N, K,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GROUP_M=8,
        DOT_FP32=interpreting() and x.dtype != torch.float32,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2 in plain torch, in x's dtype: the model's own formula (`cognica.layers.relu2`, bit for bit; a test
    holds them equal), which the CPU paths of both plugins run. The Triton kernel computes in fp32 and rounds once."""
    return torch.relu(x).square()


def relu2_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x @ w.T)^2 in plain torch, in x's dtype, exactly as the model's MLP computes it."""
    return torch.relu(F.linear(x, w)).square()


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the dispatchers in this package send `t` to a Triton kernel (CUDA tensor and triton present)."""
    return HAS_TRITON and bool(t.is_cuda)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2: Triton on CUDA, the torch reference elsewhere."""
    return relu2_triton(x) if uses_triton(x) else relu2_reference(x)


def relu2_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x @ w.T)^2 (x `[..., K]`, w `[N, K]`): the Triton GEMM on CUDA, the torch reference elsewhere."""
    return relu2_linear_triton(x, w) if uses_triton(x) else relu2_linear_reference(x, w)
