"""cognica_kernels.dispatch: which implementation each plugin op runs (COGNICA_KERNELS). On CUDA the engines' own
paths are the default until scripts/gpu_check.sh measures ours faster on a GPU class; CPU never runs Triton."""

from __future__ import annotations

import logging

import pytest

from cognica_kernels import dispatch
from cognica_kernels.dispatch import OPS, choose_kernel, kernel_setting, use_triton

H100 = "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("op", OPS)
def test_default_on_cuda_is_the_engine_path_with_its_reason(op, monkeypatch):
    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    choice = choose_kernel(op, H100)
    assert not choice.triton, f"{op}: the default on an unmeasured GPU must be the engine's path"
    assert choice.setting == "auto" and "no measurement" in choice.reason and H100 in choice.reason, choice


@pytest.mark.parametrize("op", OPS)
def test_cpu_never_runs_triton_whatever_the_setting(op, monkeypatch):
    for value in ("auto", "triton", "engine", f"{op}=triton"):
        monkeypatch.setenv("COGNICA_KERNELS", value)
        assert not choose_kernel(op, None).triton, f"COGNICA_KERNELS={value}: {op} took Triton without CUDA"


def test_triton_opts_in_every_op_and_engine_opts_out(monkeypatch):
    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    assert all(choose_kernel(op, H100).triton for op in OPS), "COGNICA_KERNELS=triton must opt every op in"
    monkeypatch.setenv("COGNICA_KERNELS", "engine")
    assert not any(choose_kernel(op, H100).triton for op in OPS), "COGNICA_KERNELS=engine must opt every op out"


def test_per_op_settings_apply_to_their_op_only():
    assert kernel_setting("attention", "attention=triton, relu2=engine") == "triton"
    assert kernel_setting("relu2", "attention=triton, relu2=engine") == "engine"
    assert kernel_setting("relu2", "attention=triton") == "auto", "an op not named is auto"
    assert kernel_setting("attention", "") == "auto", "an empty value is the default"


@pytest.mark.parametrize("value", ["fast", "attention=fast", "mlp=triton", "attention", "triton,engine"])
def test_a_bad_setting_names_the_variable(value):
    with pytest.raises(ValueError, match=r"COGNICA_KERNELS=.*expected one of"):
        kernel_setting("attention", value)


def test_auto_runs_triton_only_on_a_gpu_class_measured_faster(monkeypatch):
    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    monkeypatch.setitem(dispatch.MEASURED_FASTER, "attention", {"decode": (H100,), "prefill": (H100,)})
    assert choose_kernel("attention", H100).triton, "auto must take a kernel measured faster on this GPU"
    assert "measured it faster" in choose_kernel("attention", H100).reason
    assert not choose_kernel("attention", "NVIDIA A100-SXM4-80GB").triton, "another GPU class is not measured"
    assert not choose_kernel("relu2", H100).triton, "a verdict for attention says nothing of relu2"


def test_measured_faster_is_keyed_by_op_and_phase(monkeypatch):
    """A decode verdict says nothing of prefill: a plugin that names the phase gets that phase's verdict, one that
    runs one kernel for both (phase None) gets ours only where both phases were measured faster (the GPU check's
    verdicts are keyed the same: tests/gpu_check/test_gpu_check.py)."""
    assert {op: set(dispatch.MEASURED_FASTER[op]) for op in OPS} == {op: {"decode", "prefill"} for op in OPS}
    monkeypatch.delenv("COGNICA_KERNELS", raising=False)
    monkeypatch.setitem(dispatch.MEASURED_FASTER, "attention", {"decode": (H100,), "prefill": ()})
    assert choose_kernel("attention", H100, "decode").triton
    assert not choose_kernel("attention", H100, "prefill").triton, "prefill was not measured faster"
    assert not choose_kernel("attention", H100).triton, "one kernel for both phases needs both verdicts"
    assert "for prefill" in choose_kernel("attention", H100, "prefill").reason
    with pytest.raises(ValueError, match="unknown phase"):
        choose_kernel("attention", H100, "extend")


def test_without_triton_installed_cuda_falls_back(monkeypatch):
    monkeypatch.setenv("COGNICA_KERNELS", "triton")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    choice = choose_kernel("attention", H100)
    assert not choice.triton and "not installed" in choice.reason, choice


def test_the_choice_is_logged_once_with_its_reason(monkeypatch, caplog):
    monkeypatch.setenv("COGNICA_KERNELS", "relu2=engine")
    log = logging.getLogger("cognica.test_dispatch")
    dispatch._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(3):
            assert not use_triton("relu2", True, log)
    lines = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(lines) == 1, f"logged {len(lines)} times: {lines}"
    assert "relu2" in lines[0] and "engine's path" in lines[0] and "selects the engine" in lines[0], lines[0]


def test_one_relu2_reference_the_models_formula_bit_for_bit():
    """The kernels' torch reference is the model's relu^2 (`cognica.layers.relu2`), bit for bit in every dtype the
    engines run, so the CPU paths, the Triton kernel's tests and the reference model agree on one definition."""
    import torch

    from cognica import layers
    from cognica_kernels.relu2 import relu2_reference

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * 30, torch.tensor([0.0, -0.0, 1e-20, -1e-20, 3e4, -3e4])])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        got, want = relu2_reference(xd), layers.relu2(xd)
        assert got.dtype == want.dtype == dtype and torch.equal(got, want), f"{dtype}: relu2 references disagree"
