"""bf16 / fp16 linear layers on CPUs that have no bf16 matrix instructions (no AVX512-BF16, no AMX).

On such a CPU a bf16 matmul with more than a few rows runs through PyTorch's generic kernel at ~20 GFLOP/s on
2 cores, while fp32 runs through MKL at ~130 GFLOP/s (measured on this project's AVX2 EPYC, see BENCHMARKS.md).
A bf16 GEMM already multiplies in fp32 and accumulates in fp32 before rounding its output to bf16, so the same
product can be taken from an fp32 copy of the weight (an exact upcast) at MKL speed: `upcast_linear` does that for
inputs of `min_rows` rows or more (prefill chunks, batched decode) and keeps the bf16 weight for fewer rows, where
a matrix-vector product is bound by memory bandwidth and the bf16 weight (half the bytes) is faster. The result
differs from `F.linear` in bf16 only by the order of the fp32 accumulation.

Cost: one fp32 copy of every weight this is installed on (2x the bf16 bytes). `CPU_LINEAR_ENV` chooses:
"auto" (default: only on x86 CPUs without AVX512-BF16/AMX, for bf16/fp16 weights), "on", or "off".

The op is a torch custom op (`torch.ops.cognica_kernels.upcast_linear`) so that torch.compile (vLLM's compiled
path) keeps the row-count branch out of the graph instead of guarding on a symbolic batch size.
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F

CPU_LINEAR_ENV = "COGNICA_CPU_LINEAR"  # auto | on | off
MIN_ROWS_ENV = "COGNICA_CPU_LINEAR_MIN_ROWS"
DEFAULT_MIN_ROWS = 8  # crossover measured on AVX2 (2 threads): 4608x1536 bf16 6.3 ms vs fp32 5.7 ms at 8 rows


def cpu_has_bf16_matmul() -> bool:
    """True where PyTorch's CPU bf16 matmul has hardware support (AVX512-BF16 or AMX tiles), or off x86."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True  # never second-guess other architectures
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def upcast_wanted(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether the engines' CPU linear layers of this dtype should use `upcast_linear` (CPU_LINEAR_ENV)."""
    choice = os.environ.get(CPU_LINEAR_ENV, "auto").strip().lower()
    if choice not in ("auto", "on", "off"):
        raise ValueError(f"{CPU_LINEAR_ENV}={choice!r}: expected 'auto', 'on' or 'off'")
    if choice == "off" or torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return False
    return choice == "on" or not cpu_has_bf16_matmul()


def min_rows() -> int:
    raw = os.environ.get(MIN_ROWS_ENV, str(DEFAULT_MIN_ROWS))
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{MIN_ROWS_ENV}={raw!r}: expected a whole number of rows") from None
    if value < 1:
        raise ValueError(f"{MIN_ROWS_ENV}={value}: expected at least 1")
    return value


def upcast_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The math: the low-precision product taken in fp32 and rounded once to x's dtype."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


@torch.library.custom_op("cognica_kernels::upcast_linear", mutates_args=())
def upcast_linear(x: torch.Tensor, weight: torch.Tensor, weight_f32: torch.Tensor, bias: torch.Tensor | None,
                  rows_min: int) -> torch.Tensor:
    """y = x @ weight.T (+ bias) in x's dtype; `weight_f32` is `weight.float()`, used from `rows_min` rows on."""
    rows = x.numel() // max(1, x.shape[-1])
    if rows < rows_min:
        return F.linear(x, weight, bias)
    return upcast_linear_reference(x, weight_f32, bias)  # weight_f32.float() is weight_f32 itself: no copy


@upcast_linear.register_fake
def _(x, weight, weight_f32, bias, rows_min):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class UpcastLinear:
    """A callable `(x, weight, bias) -> y` for one layer, holding the layer's fp32 weight copy (vLLM's
    `layer.cpu_linear` signature; the `weight` argument is ignored in favour of the copies made here)."""

    def __init__(self, weight: torch.Tensor, rows_min: int | None = None):
        if weight.ndim != 2:
            raise ValueError(f"upcast linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.weight = weight.detach()
        self.weight_f32 = self.weight.float().contiguous()
        self.rows_min = min_rows() if rows_min is None else rows_min

    def __call__(self, x: torch.Tensor, weight: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)  # e.g. fp32 hidden states reaching an lm_head
        return torch.ops.cognica_kernels.upcast_linear(x, self.weight, self.weight_f32, bias, self.rows_min)

    @property
    def extra_bytes(self) -> int:
        return self.weight_f32.numel() * self.weight_f32.element_size()


def upcast_summary(switched: int, dtype: torch.dtype, extra_bytes: int) -> str:
    """The one log line both plugins print after switching `switched` linear layers to `UpcastLinear`."""
    return (f"cognica: {switched} {str(dtype).removeprefix('torch.')} linear layers take fp32 weight copies from "
            f"{min_rows()} rows on (this CPU has no bf16 matmul instructions; +{extra_bytes / 2**30:.2f} GiB; "
            f"{CPU_LINEAR_ENV}=off to disable)")
