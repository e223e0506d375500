# SPDX-License-Identifier: Apache-2.0
"""Test only: run vLLM >= 0.34's V2 model runner on a CPU, its Triton attention executed by Triton's interpreter.

vLLM 0.34 has no V1 model runner, and its CPU platform wants triton-cpu (not on the registry) for the V2 runner's
Triton kernels. This venv (`.venv/vllm-v2`, `scripts/setup.sh`) holds the CUDA wheel installed `--no-deps` on a CPU
torch and the registry's triton; the `vllm-v2` step of `scripts/test.sh` sets the environment this plugin checks:

- `TRITON_INTERPRET=1`: Triton runs kernels on CPU tensors (before triton is imported, hence the environment);
- `VLLM_TARGET_DEVICE=cpu`: vLLM's `CpuPlatform`, the CPU worker (`vllm.v1.worker.cpu_worker.CPUWorker`);
- `CUDA_VISIBLE_DEVICES` set and empty: `vllm.triton_utils.importing` keeps `HAS_TRITON` with no active Triton
  driver only then (it reads an empty list as "a distributed worker whose GPU shows up later").

and `register()`, a `vllm.general_plugins` entry point (`vllm.plugins.load_general_plugins` runs it in the first
process, the engine core and every worker), patches what the CUDA wheel cannot do on a CPU, each patch with its
reason. Each checks first that vLLM still has what it patches and raises otherwise, so a vLLM upgrade that moves one
fails the step loudly instead of testing something else. Installed into `.venv/vllm-v2` only, never shipped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

_TESTED = "0.34"  # the vLLM release these patches were written against


class ShimError(RuntimeError):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        import vllm

        raise ShimError(f"tests/vllm_v2_shim (written for vLLM {_TESTED}.x, found {vllm.__version__}): {what}; "
                        f"update the shim to the installed vLLM")


def _check_environment() -> None:
    missing = [f"{k}={v!r}" for k, v in (("TRITON_INTERPRET", "1"), ("VLLM_TARGET_DEVICE", "cpu"),
                                          ("CUDA_VISIBLE_DEVICES", "")) if os.environ.get(k) != v]
    if missing:
        raise ShimError(f"tests/vllm_v2_shim: vLLM's V2 runner on a CPU needs {', '.join(missing)} in the environment "
                        f"(scripts/test.sh, step vllm-v2, sets them)")


def _source_mentions(obj: Any, text: str) -> bool:
    return text in inspect.getsource(obj)


def _attention_backend() -> None:
    """`CpuPlatform.get_attn_backend_cls` answers TRITON_ATTN: CPU_ATTN calls the CPU wheel's compiled ops
    (`torch.ops._C.*`), absent from the CUDA wheel, while TRITON_ATTN is Triton kernels the interpreter runs."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    _require(hasattr(AttentionBackendEnum, "TRITON_ATTN"), "AttentionBackendEnum.TRITON_ATTN is gone")
    original = CpuPlatform.__dict__.get("get_attn_backend_cls")
    _require(isinstance(original, classmethod), "CpuPlatform.get_attn_backend_cls is no classmethod any more")
    if getattr(original.__func__, "_cognica_shim", False):
        return

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if attn_selector_config.use_mla or attn_selector_config.use_sparse:
            return original.__func__(cls, selected_backend, attn_selector_config, num_heads)
        return AttentionBackendEnum.TRITON_ATTN.get_path()

    get_attn_backend_cls._cognica_shim = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def _cpu_memory_env_op() -> None:
    """A no-op `_C::init_cpu_memory_env`: `CPUWorker.__init__` binds its NUMA memory node through that op of the CPU
    wheel's `_C` library, which the CUDA wheel does not build for a CPU (and cannot load without CUDA)."""
    import torch
    from vllm.v1.worker.cpu_worker import CPUWorker

    _require(_source_mentions(CPUWorker.__init__, "init_cpu_memory_env"),
             "CPUWorker.__init__ no longer calls torch.ops._C.init_cpu_memory_env")
    if hasattr(torch.ops._C, "init_cpu_memory_env"):
        return
    global _LIB
    _LIB = torch.library.Library("_C", "FRAGMENT")
    _LIB.define("init_cpu_memory_env(int[] nodes) -> ()")
    _LIB.impl("init_cpu_memory_env", lambda nodes: None, "CompositeExplicitAutograd")


_LIB = None  # the library object must outlive register() or torch drops the op


def _device_capability() -> None:
    """`torch.cuda.get_device_capability` answers (8, 0) for a CPU device: TRITON_ATTN's KV-cache write
    (`triton_reshape_and_cache_flash` in vllm.v1.attention.ops.triton_reshape_and_cache_flash) asks the key
    tensor's device for its capability to pick a tile size, which torch refuses without CUDA. (8, 0) takes the
    pre-Hopper tile; tile sizes do not change results. CUDA devices get torch's own answer."""
    import torch
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as write

    _require(_source_mentions(write, "torch.cuda.get_device_capability"),
             "triton_reshape_and_cache_flash no longer asks torch.cuda.get_device_capability")
    original: Callable = torch.cuda.get_device_capability
    if getattr(original, "_cognica_shim", False):
        return

    def get_device_capability(device=None) -> tuple[int, int]:
        if (isinstance(device, torch.device) and device.type == "cpu") or device == "cpu":
            return (8, 0)
        return original(device)

    get_device_capability._cognica_shim = True
    torch.cuda.get_device_capability = get_device_capability


def _config() -> None:
    """After `CpuPlatform.check_and_update_config`: `custom_ops = ["none"]` (the CustomOps' CPU paths, e.g.
    `RMSNorm.forward_cpu`, call the CPU wheel's compiled ops; "none" runs their torch-native forwards) and
    `kernel_config.enable_jit_warmup = False` (the CPU worker's `warmup_kernels` warms the structured-output bitmask
    kernel, which fails interpreted)."""
    from vllm.config.kernel import KernelConfig
    from vllm.platforms.cpu import CpuPlatform

    _require("enable_jit_warmup" in getattr(KernelConfig, "__dataclass_fields__", {}),
             "KernelConfig.enable_jit_warmup is gone")
    original = CpuPlatform.__dict__.get("check_and_update_config")
    _require(isinstance(original, classmethod), "CpuPlatform.check_and_update_config is no classmethod any more")
    if getattr(original.__func__, "_cognica_shim", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        original.__func__(cls, vllm_config)
        vllm_config.compilation_config.custom_ops = ["none"]
        vllm_config.kernel_config.enable_jit_warmup = False

    check_and_update_config._cognica_shim = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)


def _single_pass_attention() -> None:
    """`MIN_LAUNCH_GRID_SIZE_2D = 0`: TRITON_ATTN then always launches its single-pass 2D kernel instead of the
    split-K 3D one plus its reduction (`TritonAttentionMetadataBuilder.__init__` derives `seq_threshold_3D` from it).
    Both are exact; the interpreter runs the 2D one about 3x faster here (the attention kernel was 65-80 % of the
    step time)."""
    from vllm.v1.attention.backends import triton_attn

    _require(isinstance(getattr(triton_attn, "MIN_LAUNCH_GRID_SIZE_2D", None), int),
             "vllm.v1.attention.backends.triton_attn.MIN_LAUNCH_GRID_SIZE_2D is gone")
    triton_attn.MIN_LAUNCH_GRID_SIZE_2D = 0


def register() -> None:
    """The `vllm.general_plugins` entry point (re-entrant)."""
    _check_environment()
    from vllm.platforms import current_platform

    _require(current_platform.is_cpu(), f"expected vLLM's CPU platform, got {type(current_platform).__name__}")
    _attention_backend()
    _cpu_memory_env_op()
    _device_capability()
    _config()
    _single_pass_attention()
