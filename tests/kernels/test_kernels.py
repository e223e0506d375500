"""The Triton kernels against their torch references, on small shapes.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: this module sets `TRITON_INTERPRET=1`
before triton is imported, because `triton.jit` picks interpreter or compiler when a kernel is defined (and
the interpreter checks it again at launch, so it stays set for the process). With a GPU the same tests run the
compiled kernels on CUDA tensors. The launchers are called directly here; the dispatchers send CPU tensors to
the references, which `test_dispatch_*` checks. The GPU check's kernel-tests step runs this folder (pytest,
compiled on CUDA).
"""

from __future__ import annotations

import os

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # before the first import of triton and of the kernels

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.language import standard as tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from cognica_kernels import attention as attn_ops  # noqa: E402
from cognica_kernels import relu2 as relu2_ops  # noqa: E402
from cognica_kernels import token_pool  # noqa: E402

if not ON_GPU and not isinstance(relu2_ops._relu2_kernel, InterpretedFunction):
    # another test module imported the kernels before the variable was set: define them again, interpreted
    relu2_ops = importlib.reload(relu2_ops)
    attn_ops = importlib.reload(attn_ops)

# triton.language's own helpers (tl.cdiv, ...) are fixed when triton is first imported; if that happened before
# this module set the variable, interpreted kernels calling them fail with an unrelated-looking error.
INTERPRETER_BROKEN = not ON_GPU and not isinstance(tl_standard.cdiv, InterpretedFunction)


@pytest.fixture(autouse=True)
def _interpreter_ready():
    assert not INTERPRETER_BROKEN, (
        "triton was imported before TRITON_INTERPRET=1 was set in this process: run this file in its own pytest "
        "process, or set the variable before anything imports triton (tests/conftest.py)"
    )

DEVICE = "cuda" if ON_GPU else "cpu"
# (dtype, atol, rtol). fp32: exact math in the interpreter, ieee dots on a GPU. bf16: the reference rounds its
# fp32 result once; the kernel also rounds once (the interpreter truncates: 1 ulp = 2^-8 relative) and on a
# GPU feeds bf16 probabilities to the PV dot, so allow ~2 ulp.
FP32 = (torch.float32, 2e-5, 2e-5)
BF16 = (torch.bfloat16, 2e-2, 2e-2)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str) -> None:
    torch.testing.assert_close(
        actual.float().cpu(), expected.float().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


# --------------------------------------------------------------------------------------------------- relu^2


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, 0.0, 0.0), (torch.bfloat16, 0.0, 2**-7)])
@pytest.mark.parametrize("shape", [(1,), (3, 1537)])
def test_relu2_matches_reference(shape, dtype, atol, rtol):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3).to(device=DEVICE, dtype=dtype)
    y = relu2_ops.relu2_triton(x)
    assert y.shape == x.shape and y.dtype == x.dtype, f"got {tuple(y.shape)} {y.dtype}"
    _assert_close(y, relu2_ops.relu2_reference(x), atol, rtol, "relu2")


class _ReportsCuda:
    """Stands in for a CUDA tensor: the dispatchers only ask `is_cuda` before handing it to a launcher."""

    is_cuda = True


def test_dispatch_sends_cuda_tensors_to_triton_and_cpu_tensors_to_the_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(relu2_ops, "relu2_triton", lambda x: calls.append("relu2") or "triton")
    monkeypatch.setattr(attn_ops, "paged_attention_triton", lambda *a, **k: calls.append("attn") or "triton")
    fake = _ReportsCuda()
    assert relu2_ops.uses_triton(fake), "a CUDA tensor must take the Triton path"
    assert relu2_ops.relu2(fake) == "triton", "relu2 did not dispatch a CUDA tensor to Triton"
    assert attn_ops.paged_attention(fake, *[None] * 5, 1.0, None) == "triton", "attention did not use Triton"
    assert calls == ["relu2", "attn"], f"launchers called: {calls}"

    calls.clear()
    x = torch.randn(3, 8)
    assert not relu2_ops.uses_triton(x), "a CPU tensor must take the torch reference"
    assert torch.equal(relu2_ops.relu2(x), relu2_ops.relu2_reference(x)), "CPU relu2"
    batch = _paged_batch([2, 1], [2, 3], 2, 2, 64, torch.float32, device="cpu")
    assert torch.equal(attn_ops.paged_attention(*batch, None), attn_ops.paged_attention_reference(*batch, None))
    assert calls == [], f"CPU tensors reached a Triton launcher: {calls}"


# ----------------------------------------------------------------------------------------------- attention


def _paged_batch(
    q_lens: list[int],
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int = 16,
    device: str = DEVICE,
    seed: int = 0,
) -> tuple:
    """(q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale) over shuffled pages.

    Every cache slot no sequence owns is NaN: block 0 (vLLM's null block, where unused table entries point),
    the spare pages and the slots past each sequence's end. A kernel that loads one of them outputs NaN.
    """
    assert all(0 < q <= s for q, s in zip(q_lens, seq_lens, strict=True)), "each q_len must be in 1..seq_len"
    g = torch.Generator().manual_seed(seed)
    pages = [-(-s // page_size) for s in seq_lens]
    num_blocks = 1 + sum(pages) + 3
    order = 1 + torch.randperm(num_blocks - 1, generator=g).to(torch.int32)
    block_table = torch.zeros(len(seq_lens), max(pages) + 1, dtype=torch.int32)  # unused entries: null block 0
    cache_shape = (num_blocks, page_size, num_kv_heads, head_dim)
    key_cache = torch.full(cache_shape, float("nan"))
    value_cache = torch.full(cache_shape, float("nan"))
    used = 0
    for b, n in enumerate(pages):
        block_table[b, :n] = order[used : used + n]
        used += n
        for pos in range(seq_lens[b]):
            page, slot = block_table[b, pos // page_size], pos % page_size
            key_cache[page, slot] = torch.randn(num_kv_heads, head_dim, generator=g)
            value_cache[page, slot] = torch.randn(num_kv_heads, head_dim, generator=g)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g)
    query_start_loc = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).to(torch.int32)
    return (
        q.to(device, dtype), key_cache.to(device, dtype), value_cache.to(device, dtype), block_table.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device), query_start_loc.to(device), head_dim**-0.5,
    )  # fmt: skip


# prefill from empty (crosses pages), a decode at a page boundary (key 16 opens page 2), a chunk of 20 on a
# 50-key cached prefix, and a sequence shorter than any window
MIXED_Q_LENS, MIXED_SEQ_LENS = [37, 1, 20, 5], [37, 17, 70, 5]


@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, dtype_tol, window_left",
    [
        (4, 4, 128, FP32, None),
        (4, 2, 64, BF16, 32),
        (4, 1, 64, FP32, 7),
        (2, 2, 128, BF16, None),
    ],
    ids=["mha-hd128-fp32-full", "gqa-hd64-bf16-w32", "mqa-hd64-fp32-w7", "mha-hd128-bf16-full"],
)
def test_prefill_mixed_batch_matches_reference(num_heads, num_kv_heads, head_dim, dtype_tol, window_left):
    dtype, atol, rtol = dtype_tol
    batch = _paged_batch(MIXED_Q_LENS, MIXED_SEQ_LENS, num_heads, num_kv_heads, head_dim, dtype)
    out = attn_ops.paged_attention_triton(*batch, window_left)
    _assert_close(out, attn_ops.paged_attention_reference(*batch, window_left), atol, rtol, "prefill")


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize(
    "num_heads, num_kv_heads, head_dim, dtype_tol, window_left",
    [(4, 4, 128, FP32, 32), (8, 2, 64, BF16, None)],
    ids=["mha-hd128-fp32-w32", "gqa-hd64-bf16-full"],
)
def test_decode_matches_reference(num_heads, num_kv_heads, head_dim, dtype_tol, window_left, num_splits):
    dtype, atol, rtol = dtype_tol
    seq_lens = [1, 16, 17, 33, 100]  # a lone first token, page edges, context shorter and longer than the window
    batch = _paged_batch([1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim, dtype)
    out = attn_ops.paged_attention_triton(*batch, window_left, num_splits=num_splits)
    _assert_close(out, attn_ops.paged_attention_reference(*batch, window_left), atol, rtol, "decode")


@pytest.mark.parametrize("window_left, q_len", [(32, 1), (512, 3)], ids=["w32-decode", "w512-chunk"])
def test_window_includes_the_window_left_th_key_before_and_excludes_the_next(window_left, q_len):
    # The last query sits at position window_left + 1: key 1 is window_left keys before it (in), key 0 is
    # window_left + 1 before (out). Keys 0 and 1 align with every query and carry opposite values, so a
    # window one key too wide or too narrow moves the output by ~1.
    head_dim, seq_len = 64, window_left + 2
    q, kc, vc, bt, sl, qsl, scale = _paged_batch([q_len], [seq_len], 2, 2, head_dim, torch.float32)
    direction = F.normalize(torch.randn(2, head_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    q[:] = direction.to(q.device) * head_dim**0.5
    kc[:] *= 0.1
    vc[:] *= 0.1
    for pos, sign in ((0, 1.0), (1, -1.0)):
        page, slot = bt[0, pos // kc.shape[1]], pos % kc.shape[1]
        kc[page, slot] = direction.to(q.device) * 2 * head_dim**0.5  # logit 2 * sqrt(d) = 16 vs ~0.1 elsewhere
        vc[page, slot] = sign
    batch = (q, kc, vc, bt, sl, qsl, scale)
    out = attn_ops.paged_attention_triton(*batch, window_left)
    expected = attn_ops.paged_attention_reference(*batch, window_left)
    _assert_close(out, expected, *FP32[1:], f"window_left={window_left}")
    last = expected[-1].float().cpu()
    assert torch.allclose(last, torch.full_like(last, -1.0), atol=0.05), f"last query must see key 1 only: {last}"
    for wrong in (window_left - 1, window_left + 1):
        moved = (attn_ops.paged_attention_reference(*batch, wrong)[-1].float().cpu() - last).abs().min()
        assert moved > 0.4, f"the test cannot tell window_left={wrong} from {window_left} (moved {moved})"


@pytest.mark.parametrize("num_splits, q_len", [(1, 1), (4, 1), (1, 8)], ids=["decode", "decode-split4", "chunk"])
def test_windowed_attention_never_reads_keys_outside_the_window(num_splits, q_len):
    # poison, with NaN, every cached key and value the window hides from the first query (whole pages and
    # the hidden part of the page the window starts in): one load of them would make the output NaN
    window_left, seq_len = 32, 200
    q, kc, vc, bt, sl, qsl, scale = _paged_batch([q_len], [seq_len], 4, 2, 64, torch.float32)
    expected = attn_ops.paged_attention_reference(q, kc, vc, bt, sl, qsl, scale, window_left)
    page_size = kc.shape[1]
    for pos in range(seq_len - q_len - window_left):
        kc[bt[0, pos // page_size], pos % page_size] = float("nan")
        vc[bt[0, pos // page_size], pos % page_size] = float("nan")
    poisoned = (q, kc, vc, bt, sl, qsl, scale)
    full = attn_ops.paged_attention_reference(*poisoned, None)
    assert full.isnan().any(), "the poison must reach a reader of the whole context"
    out = attn_ops.paged_attention_triton(*poisoned, window_left, num_splits=num_splits)
    assert out.isfinite().all(), "the kernel read a key or value outside the window"
    _assert_close(out, expected, *FP32[1:], "windowed attention on a poisoned cache")


def test_token_pool_layout_matches_paged_layout():
    # SGLang's token pool is the paged layout with page size 1 and req_to_token rows as the block table
    torch.manual_seed(0)
    num_slots, num_kv_heads, head_dim, num_heads = 300, 2, 64, 4
    q_lens, seq_lens = [6, 1], [40, 23]
    k_pool = torch.randn(num_slots, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    v_pool = torch.randn(num_slots, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    req_to_token = torch.randperm(num_slots)[: 3 * 64].view(3, 64).to(device=DEVICE, dtype=torch.int32)
    req_pool_indices = torch.tensor([2, 0], device=DEVICE)
    q = torch.randn(sum(q_lens), num_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    seq_t = torch.tensor(seq_lens, device=DEVICE)
    q_len_t = torch.tensor(q_lens, device=DEVICE)
    args = (q, k_pool, v_pool, req_to_token, req_pool_indices, seq_t, q_len_t, head_dim**-0.5, 16)
    pooled = token_pool.token_pool_attention(*args)

    # the same keys copied into a contiguous page-16 cache, one page run per sequence
    page, max_pages = 16, 3
    key_cache = torch.zeros(2 * max_pages, page, num_kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    value_cache = torch.zeros_like(key_cache)
    for b, (req, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens, strict=True)):
        slots = req_to_token[req, :n].long()
        key_cache.view(2, max_pages * page, num_kv_heads, head_dim)[b, :n] = k_pool[slots]
        value_cache.view(2, max_pages * page, num_kv_heads, head_dim)[b, :n] = v_pool[slots]
    block_table = torch.arange(2 * max_pages, dtype=torch.int32, device=DEVICE).view(2, max_pages)
    qsl = F.pad(q_len_t.cumsum(0), (1, 0)).to(torch.int32)
    paged = (q, key_cache, value_cache, block_table, seq_t.to(torch.int32), qsl, head_dim**-0.5)
    expected = attn_ops.paged_attention_reference(*paged, 16)
    _assert_close(pooled, expected, *BF16[1:], "token_pool_attention vs the paged reference")

    pool_table = token_pool.block_table_from_req_to_token(req_to_token, req_pool_indices)
    out = attn_ops.paged_attention_triton(
        q, k_pool.unsqueeze(1), v_pool.unsqueeze(1), pool_table, seq_t.to(torch.int32), qsl, head_dim**-0.5, 16
    )
    _assert_close(out, expected, *BF16[1:], "the kernel over the token pool (page size 1)")


@pytest.mark.parametrize("window", [None, 0, 7, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_over_the_token_pool_equals_the_reference(window, dtype):
    """The CPU decode path (one gather for the whole batch) against the per-sequence torch reference: windows
    shorter and longer than the sequences, GQA, a sequence of one token, chunking of the batch."""
    torch.manual_seed(1)
    num_slots, num_kv_heads, head_dim, num_heads = 700, 2, 64, 6
    seq_lens = [1, 23, 90, 41, 64]
    k_pool = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype)
    v_pool = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype)
    req_to_token = torch.randperm(num_slots)[: 6 * 96].view(6, 96).to(torch.int32)
    req_pool_indices = torch.tensor([5, 0, 3, 1, 2])
    q = torch.randn(len(seq_lens), num_heads, head_dim, dtype=dtype)
    seq_t = torch.tensor(seq_lens)
    ones = torch.ones(len(seq_lens), dtype=torch.long)
    expected = token_pool.token_pool_attention(q, k_pool, v_pool, req_to_token, req_pool_indices, seq_t, ones,
                                               head_dim**-0.5, window)
    for chunk in (1 << 15, 100):  # 100 keys: one or two sequences per chunk
        got = token_pool.token_pool_decode_attention(q, k_pool, v_pool, req_to_token, req_pool_indices, seq_t,
                                                     head_dim**-0.5, window, max_keys_per_chunk=chunk)
        assert got.dtype == dtype and not got.isnan().any()
        tol = (1e-5, 1e-5) if dtype == torch.float32 else BF16[1:]
        _assert_close(got, expected, *tol, f"batched decode, window {window}, chunk {chunk}")


def test_batched_decode_never_reads_out_of_window_slots():
    torch.manual_seed(2)
    k_pool = torch.randn(64, 1, 16)
    v_pool = torch.randn(64, 1, 16)
    req_to_token = torch.arange(64, dtype=torch.int32).view(1, 64)
    seq_t = torch.tensor([50])
    q = torch.randn(1, 2, 16)
    args = (req_to_token, torch.tensor([0]), seq_t, 0.25, 9)
    clean = token_pool.token_pool_decode_attention(q, k_pool, v_pool, *args)
    k_pool[:40], v_pool[:40] = float("nan"), float("nan")  # keys 0..39 are outside the 10-key window of position 49
    assert torch.equal(token_pool.token_pool_decode_attention(q, k_pool, v_pool, *args), clean)


def test_decode_split_k_fills_the_gpu_by_its_own_sm_count():
    """Split-K is sized by the device's SM count (`num_sms`, from torch.cuda.get_device_properties), and it
    engages for an S layer (513 keys) at batch 32 x 12 KV heads, where the first heuristic gave none."""
    variant = attn_ops.kernel_variant
    assert variant(32, 12, 12, 1, 2048, 512, sms=132)["NUM_SPLITS"] == 2, "S layer at batch 32 on an H100"
    assert variant(256, 12, 12, 1, 2048, 512, sms=132)["NUM_SPLITS"] == 1, "batch 256 fills the GPU unsplit"
    assert variant(1, 12, 12, 1, 2048, None, sms=132)["NUM_SPLITS"] == 16, "an L layer at batch 1: 16 splits"
    assert variant(1, 12, 12, 1, 2048, 512, sms=132)["NUM_SPLITS"] == 5, "an S layer keeps >= 128 keys per split"
    assert variant(40, 12, 12, 1, 2048, 512, sms=132)["NUM_SPLITS"] == 2
    assert variant(40, 12, 12, 1, 2048, 512, sms=108)["NUM_SPLITS"] == 1, "an A100 has fewer SMs to fill"
    assert variant(32, 12, 12, 64, 2048, 512, sms=132)["NUM_SPLITS"] == 1, "prefill never splits"
    assert attn_ops.num_sms(None) == 132, "without a CUDA device the H100 SXM count stands in"


@pytest.mark.parametrize("window_left", [64, None], ids=["w64", "full"])
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80-tiles", "sm90-tiles"])
def test_prefill_tiles_of_each_architecture_match_reference(monkeypatch, arch, window_left):
    """The launcher sizes prefill tiles by the device (`device_arch`): 128 query rows x 64 keys with 8 warps on
    Hopper (FA-class), 32 x 16 on an A100. Each choice is exact: a 130-token prefill (two 128-row tiles, the second
    one row long), a 40-token chunk on a 560-key prefix (past the window) and a decode step in one batch."""
    monkeypatch.setattr(attn_ops, "device_arch", lambda device_index: arch)
    variant = attn_ops.kernel_variant(3, 2, 2, 130, 600, window_left, arch=arch)
    expected = {80: (32, 16, 8), 90: (128, 64, 8)}[arch]
    assert (variant["BLOCK_M"], variant["BLOCK_N"], variant["num_warps"]) == expected, variant
    assert variant["NUM_STAGES"] == 5, "two-deep software pipelining of the block table and K/V"
    dtype, atol, rtol = BF16
    batch = _paged_batch([130, 40, 1], [130, 600, 300], 2, 2, 128, dtype)
    out = attn_ops.paged_attention_triton(*batch, window_left)
    _assert_close(out, attn_ops.paged_attention_reference(*batch, window_left), atol, rtol, f"sm_{arch} tiles")


@pytest.mark.parametrize("window_left", [300, None], ids=["w300", "full"])
def test_mixed_batch_sends_one_query_rows_to_the_decode_tile_with_split_k(monkeypatch, window_left):
    """A mixed batch (#29): the sequences with one query take the decode tile (16 rows, 4 warps, split-K by the SM
    count and the caller's static max_seq_len), the others the prefill tile, one launch each, each skipping the
    other's rows; the split-K merge writes only the one-query tokens. Decode rows first, between and last, fp32."""
    launches = []
    real = attn_ops._launch

    def record(*args):
        variant, num_splits, rows = args[-4:-1]
        launches.append((variant["BLOCK_M"], variant["num_warps"], num_splits, rows))
        return real(*args)

    monkeypatch.setattr(attn_ops, "_launch", record)
    dtype, atol, rtol = FP32
    batch = _paged_batch([1, 40, 1, 1, 17, 1], [300, 600, 90, 1, 200, 513], 2, 2, 64, dtype)
    out = attn_ops.paged_attention_triton(*batch, window_left, max_query_len=40, max_seq_len=1024)
    splits = attn_ops.kernel_variant(6, 2, 2, 1, 1024, window_left)["NUM_SPLITS"]
    assert splits > 1, "the decode rows must split here"
    prefill = attn_ops.kernel_variant(6, 2, 2, 40, 1024, window_left)
    assert launches == [(16, 4, splits, attn_ops.DECODE_ROWS),
                        (prefill["BLOCK_M"], prefill["num_warps"], 1, attn_ops.PREFILL_ROWS)], launches
    _assert_close(out, attn_ops.paged_attention_reference(*batch, window_left), atol, rtol, "mixed batch")


def test_decode_tiles_are_the_same_on_both_architectures():
    """Decode (and short chunks, <= 16 rows) keeps 4 warps and 32-key tiles everywhere: double-buffered K/V of
    32 KiB, four programs per A100 SM (tests/kernels_compile/test_compile.py checks the compiled occupancy)."""
    for arch in (80, 90, None):
        variant = attn_ops.kernel_variant(32, 12, 12, 1, 2048, 512, arch=arch)
        assert (variant["BLOCK_M"], variant["BLOCK_N"], variant["num_warps"], variant["NUM_STAGES"]) == (16, 32, 4, 5)
