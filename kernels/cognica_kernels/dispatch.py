"""Which implementation each plugin op runs: the engine's own, or this package's Triton kernel.

One setting, `COGNICA_KERNELS`, read when a model is built:

| value | attention | relu2 (the MLP activation) |
|---|---|---|
| `auto` (default) | the engine's (vLLM FLASH_ATTN, SGLang's backend) | torch's, fused by the engine's compile |
| `engine` | the engine's everywhere (on CPU too) | torch's |
| `triton` | ours on CUDA | ours on CUDA |
| per op, e.g. `attention=triton,relu2=engine` | as named; an op not named is `auto` | as named |

`auto` runs ours only on a GPU class where it was measured faster (`MEASURED_FASTER`, below).
On CPU the engine path is always taken for CUDA kernels; the one CPU op of ours (SGLang's batched torch decode
attention, `token_pool_decode_attention`) runs unless `attention=engine`.

"Measured faster" means: `scripts/gpu_check.sh` on that GPU class printed the verdict "triton" for the op and the
phase (decode: one query per sequence; prefill: longer chunks, mixed batches included): at every side-by-side row of
that phase ours was faster than every peer that passed its cross-check, by the median of at least 5 CUDA-graph
replays, with the gap larger than the replays' spread, and every cross-check of ours passed.
`MEASURED_FASTER[op][phase]` lists those GPU classes by the name `torch.cuda.get_device_name` gives; it is empty: no
GPU verdict has said "triton" yet, so `auto` is the engine everywhere. A plugin that cannot tell the phases apart
(`phase=None`) takes ours only where every phase was measured faster. Why the engine by default: vLLM's FLASH_ATTN
(FA3 on Hopper) and SGLang's backends already start their key loop at the window start of each S layer, so the
windows cost them no more than ours, and their kernels are proven; a Triton relu² inside vLLM's compiled graph
also risks its AOT compile cache (user Triton kernels failed to reload from it in torch releases before January
2026), while Inductor fuses `relu(x).square()` itself. See docs/performance.md.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .utils import HAS_TRITON

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

KERNELS_ENV = "COGNICA_KERNELS"
OPS = ("attention", "relu2")
PHASES = ("decode", "prefill")
SETTINGS = ("auto", "engine", "triton")
# op -> phase -> GPU classes (torch.cuda.get_device_name) where scripts/gpu_check.sh's verdict for the op and phase
# was "triton" (benchmarks/gpu_check.py `verdicts`, keyed the same way)
MEASURED_FASTER: dict[str, dict[str, tuple[str, ...]]] = {op: {phase: () for phase in PHASES} for op in OPS}


@dataclass(frozen=True)
class KernelChoice:
    op: str
    triton: bool  # run this package's Triton kernel (else the engine's / torch's path)
    setting: str  # the COGNICA_KERNELS value that applied to the op
    reason: str


def kernel_setting(op: str, value: str | None = None) -> str:
    """The setting for `op` from COGNICA_KERNELS (or `value`): 'auto', 'engine' or 'triton'. Raises ValueError
    naming the variable on anything else."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}: expected one of {OPS}")
    raw = (os.environ.get(KERNELS_ENV, "auto") if value is None else value).strip() or "auto"
    expected = f"expected one of {SETTINGS} or per op, e.g. 'attention=triton,relu2=engine' (ops: {OPS})"
    if "=" not in raw:
        if raw not in SETTINGS:
            raise ValueError(f"{KERNELS_ENV}={raw!r}: {expected}")
        return raw
    per_op: dict[str, str] = {}
    for part in raw.split(","):
        name, sep, setting = (s.strip() for s in part.partition("="))
        if not sep or name not in OPS or setting not in SETTINGS:
            raise ValueError(f"{KERNELS_ENV}={raw!r}: bad entry {part.strip()!r}; {expected}")
        per_op[name] = setting
    return per_op.get(op, "auto")


def measured_faster(op: str, device_name: str, phase: str | None = None) -> bool:
    """Whether scripts/gpu_check.sh measured ours faster for `op` on `device_name` in `phase` (None: in every
    phase, for a caller that runs one kernel for all of them)."""
    if phase is not None and phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: expected one of {PHASES} or None")
    return all(device_name in MEASURED_FASTER[op][p] for p in ((phase,) if phase else PHASES))


def choose_kernel(op: str, device_name: str | None, phase: str | None = None) -> KernelChoice:
    """The choice for `op` on a CUDA device named `device_name` (None: not CUDA) in `phase` ('decode', 'prefill',
    or None for a kernel that serves both), with its reason."""
    setting = kernel_setting(op)
    if device_name is None:
        return KernelChoice(op, False, setting, "not on CUDA: the Triton kernels run only there")
    if setting == "engine":
        return KernelChoice(op, False, setting, f"{KERNELS_ENV} selects the engine's path")
    if not HAS_TRITON:
        return KernelChoice(op, False, setting, "triton is not installed")
    if setting == "triton":
        return KernelChoice(op, True, setting, f"{KERNELS_ENV} opts in to the cognica_kernels Triton kernel")
    where = f"{device_name}" + (f" for {phase}" if phase else " in every phase")
    if measured_faster(op, device_name, phase):
        return KernelChoice(op, True, setting, f"scripts/gpu_check.sh measured it faster on {where}")
    return KernelChoice(op, False, setting, f"no measurement shows the cognica_kernels Triton kernel faster on "
                                            f"{where} (scripts/gpu_check.sh; opt in with {KERNELS_ENV}=triton)")


@functools.cache
def _cuda_device_name(index: int) -> str:
    import torch

    return torch.cuda.get_device_name(index)


@functools.cache
def _log_once(choice: KernelChoice, device_name: str | None, log: logging.Logger) -> None:
    path = "the cognica_kernels Triton kernel" if choice.triton else "the engine's path"
    log.info("cognica: %s runs %s on %s: %s", choice.op, path, device_name or "CPU", choice.reason)


def use_triton(op: str, is_cuda: bool, log: logging.Logger | None = None, phase: str | None = None) -> bool:
    """The plugins' switch for `op` on this process's device (in `phase`; None: one choice for every phase); the
    choice and its reason are logged once per process to `log` (the plugin's logger, which the engine prints;
    default this module's)."""
    import torch

    device_name = _cuda_device_name(torch.cuda.current_device()) if is_cuda and torch.cuda.is_available() else None
    if is_cuda and device_name is None:
        device_name = "CUDA"  # a caller that simulates a CUDA engine without a device (tests)
    choice = choose_kernel(op, device_name, phase)
    _log_once(choice, device_name, log or logger)
    return choice.triton


def relu2_activation(is_cuda: bool, log: logging.Logger | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """relu^2 for both plugins' MLP: the Triton op (`relu2.relu2`) on CUDA where `use_triton` chooses it, else the
    torch formula (`relu2.relu2_reference`, bit for bit `cognica.layers.relu2`), which the engine's compile fuses."""
    from .relu2 import relu2, relu2_reference

    return relu2 if use_triton("relu2", is_cuda, log) else relu2_reference
