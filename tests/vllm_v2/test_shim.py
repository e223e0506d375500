"""The test-only plugin tests/vllm_v2_shim (.venv/vllm-v2) fails loudly, naming what is missing, when the environment
or vLLM stops matching what it patches, instead of letting the step test something else."""

from __future__ import annotations

import pytest
import vllm_v2_shim
from vllm.v1.attention.backends import triton_attn


def test_missing_environment_is_refused(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(vllm_v2_shim.ShimError, match="CUDA_VISIBLE_DEVICES=''"):
        vllm_v2_shim.register()


def test_a_patched_name_vllm_no_longer_has_is_refused(monkeypatch):
    monkeypatch.delattr(triton_attn, "MIN_LAUNCH_GRID_SIZE_2D")
    with pytest.raises(vllm_v2_shim.ShimError, match="MIN_LAUNCH_GRID_SIZE_2D is gone"):
        vllm_v2_shim.register()


def test_registered_patches_are_in_place():
    from vllm.platforms.cpu import CpuPlatform

    vllm_v2_shim.register()
    assert getattr(CpuPlatform.get_attn_backend_cls.__func__, "_cognica_shim", False), "attention backend not patched"
    assert getattr(CpuPlatform.check_and_update_config.__func__, "_cognica_shim", False), "config not patched"
    assert triton_attn.MIN_LAUNCH_GRID_SIZE_2D == 0, "the single-pass 2D attention kernel is not chosen"
