"""cognica_kernels.cpu_linear: the fp32-copy linear used for bf16/fp16 models on CPUs without bf16 matmul."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cognica_kernels import cpu_linear
from cognica_kernels.cpu_linear import UpcastLinear, upcast_linear_reference


def _data(rows: int, dtype: torch.dtype, bias: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    w = (torch.randn(160, 96, generator=g) / 10).to(dtype)
    b = torch.randn(160, generator=g).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [8, 9, 64])
def test_many_rows_take_the_fp32_product_rounded_once(dtype, bias, rows):
    x, w, b = _data(rows, dtype, bias)
    got = UpcastLinear(w, rows_min=8)(x, w, b)
    assert got.dtype == dtype and got.shape == (rows, 160)
    torch.testing.assert_close(got, upcast_linear_reference(x, w, b), rtol=0, atol=0)
    # and it is the bf16 GEMM's answer up to fp32 accumulation order: within one rounding of the output dtype
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_few_rows_keep_the_low_precision_weight(rows):
    x, w, _ = _data(rows, torch.bfloat16)
    layer = UpcastLinear(w, rows_min=8)
    torch.testing.assert_close(layer(x), F.linear(x, w), rtol=0, atol=0)


def test_leading_dims_count_as_rows():
    x, w, _ = _data(12, torch.bfloat16)
    got = UpcastLinear(w, rows_min=8)(x.view(3, 4, 96))  # 12 rows in total: the fp32 path
    torch.testing.assert_close(got, upcast_linear_reference(x, w).view(3, 4, 160), rtol=0, atol=0)


def test_fp32_copy_is_exact_and_counted():
    _, w, _ = _data(1, torch.bfloat16)
    layer = UpcastLinear(w)
    assert layer.weight_f32.dtype == torch.float32 and torch.equal(layer.weight_f32.to(torch.bfloat16), w)
    assert layer.extra_bytes == w.numel() * 4
    with pytest.raises(ValueError, match="2-D weight"):
        UpcastLinear(w[0])


def test_custom_op_passes_opcheck():
    x, w, b = _data(16, torch.bfloat16, bias=True)
    torch.library.opcheck(torch.ops.cognica_kernels.upcast_linear.default, (x, w, w.float(), b, 8))
    torch.library.opcheck(torch.ops.cognica_kernels.upcast_linear.default, (x[:2], w, w.float(), None, 8))


def test_compiled_graph_keeps_the_row_branch_at_run_time():
    """Under torch.compile with a dynamic batch, one graph serves both paths (no guard on the row count)."""
    torch._dynamo.reset()
    x, w, _ = _data(32, torch.bfloat16)
    layer = UpcastLinear(w, rows_min=8)
    fn = torch.compile(lambda t: layer(t) * 2, fullgraph=True, dynamic=True)
    for rows in (2, 16, 5, 31):
        torch.testing.assert_close(fn(x[:rows]), layer(x[:rows]) * 2, rtol=0, atol=0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames == 1, f"expected one compiled graph for every batch size, got {frames}"


def test_policy_follows_the_env_and_the_cpu(monkeypatch):
    monkeypatch.setattr(cpu_linear, "cpu_has_bf16_matmul", lambda: False)
    monkeypatch.delenv(cpu_linear.CPU_LINEAR_ENV, raising=False)
    assert cpu_linear.upcast_wanted(torch.bfloat16) and cpu_linear.upcast_wanted(torch.float16)
    assert not cpu_linear.upcast_wanted(torch.float32), "fp32 weights are already what the copy would be"
    assert not cpu_linear.upcast_wanted(torch.bfloat16, "meta"), "only CPU tensors"
    monkeypatch.setattr(cpu_linear, "cpu_has_bf16_matmul", lambda: True)
    assert not cpu_linear.upcast_wanted(torch.bfloat16), "auto: CPUs with bf16 matmul keep the engine's GEMM"
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "on")
    assert cpu_linear.upcast_wanted(torch.bfloat16)
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "off")
    monkeypatch.setattr(cpu_linear, "cpu_has_bf16_matmul", lambda: False)
    assert not cpu_linear.upcast_wanted(torch.bfloat16)
    monkeypatch.setenv(cpu_linear.CPU_LINEAR_ENV, "fast")
    with pytest.raises(ValueError, match="COGNICA_CPU_LINEAR='fast'"):
        cpu_linear.upcast_wanted(torch.bfloat16)


def test_min_rows_env(monkeypatch):
    monkeypatch.delenv(cpu_linear.MIN_ROWS_ENV, raising=False)
    assert cpu_linear.min_rows() == cpu_linear.DEFAULT_MIN_ROWS
    monkeypatch.setenv(cpu_linear.MIN_ROWS_ENV, "4")
    assert cpu_linear.min_rows() == 4 and UpcastLinear(torch.zeros(2, 2, dtype=torch.bfloat16)).rows_min == 4
    for bad in ("0", "x"):
        monkeypatch.setenv(cpu_linear.MIN_ROWS_ENV, bad)
        with pytest.raises(ValueError, match=cpu_linear.MIN_ROWS_ENV):
            cpu_linear.min_rows()
