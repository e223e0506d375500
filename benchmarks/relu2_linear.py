"""A GEMM with relu^2 in its epilogue, `relu(x @ w.T)^2`: a fused candidate for `mlp.c_fc` plus the activation that
the GPU check measures (`benchmarks/gpu_check.py kernels`) against what the product runs, `F.linear` followed by
`cognica_kernels.relu2`. No plugin calls it, so it lives here and not in `cognica_kernels`; its parity test is in
tests/kernels/test_kernels.py and its sm_80/sm_90 compile in tests/kernels_compile/test_compile.py.

Layouts (row-major, any float dtype; bf16 in the model): x `[M, K]` (or `[..., K]`), w `[N, K]` like an
`nn.Linear` weight (no bias: the model has none). Output `relu(x @ w.T)^2`, `[..., N]`, dtype of x, accumulated in
fp32 and rounded once, so the `[M, 6144]` pre-activation never goes to memory. `relu2_linear_reference` rounds the
matmul to x's dtype before squaring, as the model's MLP does, so in bf16 the two differ by up to ~2 ulp.
`relu2_linear` runs the Triton GEMM on CUDA tensors and the reference elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cognica_kernels.utils import HAS_TRITON, dot_fp32, dot_precision, tl, triton, uses_triton


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
        DOT_FP32=dot_fp32(x.dtype),
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return y.view(*x.shape[:-1], N)


def relu2_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x @ w.T)^2 in plain torch, in x's dtype, exactly as the model's MLP computes it."""
    return torch.relu(F.linear(x, w)).square()


def relu2_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """relu(x @ w.T)^2 (x `[..., K]`, w `[N, K]`): the Triton GEMM on CUDA, the torch reference elsewhere."""
    return relu2_linear_triton(x, w) if uses_triton(x) else relu2_linear_reference(x, w)
