"""What every op module of this package shares (Liger's `ops/utils.py`): triton or a stand-in, the interpreter
switch, the `tl.dot` precision, the Triton-or-reference choice of the public entries, and the head-count check.

Without triton (a CPU-only torch) `triton.jit` is the identity and `tl.constexpr` is None, so the op modules still
import and their torch references still serve; `HAS_TRITON` says which.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # a CPU-only torch without triton: the references still serve
    from types import SimpleNamespace

    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 for fp32 runs (the parity runs), tf32 (the default) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_fp32(dtype: torch.dtype) -> bool:
    """Whether a kernel must multiply in fp32: the interpreter's bf16 `tl.dot` is wrong (engines.md)."""
    return interpreting() and dtype != torch.float32


def uses_triton(t: torch.Tensor) -> bool:
    """Whether the dispatchers in this package send `t` to a Triton kernel (CUDA tensor and triton present)."""
    return HAS_TRITON and bool(t.is_cuda)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()


def kv_group(num_heads: int, num_kv_heads: int) -> int:
    """Query heads per KV head (GQA); raises unless the query heads are a multiple of the KV heads."""
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    return num_heads // num_kv_heads
