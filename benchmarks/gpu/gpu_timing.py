"""Timing helpers and paged attention inputs of the GPU kit (gpu_check.py, paged_decode.py, roofline.py beside
this file): torch and triton only. One timer (`Timer`), one paged-input builder (`paged_inputs`), and
torch SDPA over a paged cache (`sdpa_paged_decode`).

On CUDA a time is the median of CUDA-event intervals, warm-up runs excluded, with L2 flushed (a 256 MB buffer
zeroed) before every timed run. The dry run (`scripts/gpu_check.sh --dry-run`: CPU tensors, Triton's interpreter)
takes the same code path with `time.perf_counter` and no flush, so its times mean nothing; only that it runs.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

L2_FLUSH_BYTES = 256 << 20  # > the 50 MB L2 of an H100 / H200


class Timer:
    """Median time of a callable on one device; `prepare` runs before each call, outside the timed interval."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush_l2(self) -> None:
        if self._flush is not None:
            self._flush.zero_()

    def median_ms(
        self, fn: Callable[[], object], reps: int, warmup: int, prepare: Callable[[], None] | None = None,
        check: Callable[[object], None] | None = None,
    ) -> tuple[float, list[float]]:
        """(median ms, every timed ms). `check(result)` runs after each timed call, untimed."""
        for _ in range(warmup):
            if prepare is not None:
                prepare()
            fn()
        self.sync()
        times = []
        for _ in range(reps):
            self.flush_l2()
            if prepare is not None:
                prepare()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - t0) * 1e3)
            if check is not None:
                check(result)
            del result
        return statistics.median(times), times


def copy_rate_gbps(timer: Timer, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy rate, counting the read and the write: the bandwidth a kernel can hope for."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=timer.device).random_(0, 255)
    dst = torch.empty_like(src)
    ms, _ = timer.median_ms(lambda: dst.copy_(src), reps=reps, warmup=2)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gemm_rate_tflops(timer: Timer, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """Dense n x n x n matmul rate: the compute a kernel can hope for."""
    a = torch.randn(n, n, device=timer.device, dtype=dtype)
    b = torch.randn(n, n, device=timer.device, dtype=dtype)
    ms, _ = timer.median_ms(lambda: a @ b, reps=reps, warmup=2)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def paged_inputs(batch: int, ctx: int, q_len: int, heads: int, head_dim: int, page: int, device: torch.device,
                 seed: int, dtype: torch.dtype = torch.bfloat16, vllm_layout: bool = False) -> tuple:
    """(q, key_cache, value_cache, block_table, seq_lens, query_start_loc): `batch` sequences of `ctx` cached keys
    (this step's `q_len` included) on shuffled pages of `page` tokens, random K/V and queries from `seed`.

    key_cache / value_cache are `[num_blocks, page, heads, head_dim]`: two tensors, or with `vllm_layout` views of
    vLLM's one `[num_blocks, heads, page, 2 * head_dim]` tensor (`kv.transpose(1, 2).split(head_dim, -1)`)."""
    g = torch.Generator(device=device).manual_seed(seed)
    pages = -(-ctx // page)
    blocks = batch * pages
    if vllm_layout:
        kv = torch.randn(blocks, heads, page, 2 * head_dim, device=device, dtype=dtype, generator=g)
        key_cache, value_cache = kv.transpose(1, 2).split(head_dim, -1)
    else:
        key_cache = torch.randn(blocks, page, heads, head_dim, device=device, dtype=dtype, generator=g)
        value_cache = torch.randn(blocks, page, heads, head_dim, device=device, dtype=dtype, generator=g)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed))
    block_table = order.to(device=device, dtype=torch.int32).view(batch, pages)
    q = torch.randn(batch * q_len, heads, head_dim, device=device, dtype=dtype, generator=g)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    query_start_loc = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    return q, key_cache, value_cache, block_table, seq_lens, query_start_loc


def sdpa_paged_decode(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float, window_left: int) -> torch.Tensor:
    """Decode attention (one query per sequence, q `[B, heads, hd]`) by torch SDPA over the pages that hold each
    sequence's window, gathered through the block table: fixed shapes and no host sync, so a CUDA graph captures it.
    The stand-in for the engines' default attention in the "default" rows of paged_decode.py."""
    batch, pages = block_table.shape
    page = key_cache.shape[1]
    nkv, hd = key_cache.shape[2], key_cache.shape[3]
    span = min(pages, -(-window_left // page) + 1)  # pages that can hold the query and the window_left keys before it
    last = seq_lens.long() - 1  # the query's position
    first_page = ((last - window_left).clamp(min=0) // page).clamp(max=pages - span)
    cols = first_page[:, None] + torch.arange(span, device=q.device)
    blocks = block_table.gather(1, cols).long()
    k = key_cache[blocks].reshape(batch, span * page, nkv, hd).transpose(1, 2)
    v = value_cache[blocks].reshape(batch, span * page, nkv, hd).transpose(1, 2)
    pos = (cols[:, :, None] * page + torch.arange(page, device=q.device)).reshape(batch, span * page)
    visible = (pos <= last[:, None]) & (pos >= last[:, None] - window_left)
    out = torch.nn.functional.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=visible[:, None, None, :],
                                                           scale=scale, enable_gqa=q.shape[1] != nkv)  # fmt: skip
    return out[:, :, 0, :]


def device_info(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {"device": str(device), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name, sm=f"{props.major}.{props.minor}", capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
        )  # fmt: skip
    else:
        info.update(name="cpu (dry run, TRITON_INTERPRET=1)", capability="cpu")
    return info
