"""Kernel timings of the GPU check, its side-by-side compare, and its final report. Run by `run.sh` beside this
file (entry point `scripts/gpu_check.sh`; README.md here documents the whole).

    python benchmarks/gpu/gpu_check.py kernels --out OUT/kernels.json [--dry-run]
    python benchmarks/gpu/gpu_check.py report OUT          # prints the table, writes OUT/gpu_check.json

Each case times our Triton attention launcher (`cognica_kernels.attention.paged_attention_triton`) in bf16: the
median of CUDA-event intervals after warm-up, L2 flushed and fresh random queries before every timed run, and the
output poisoned before every run (the launcher's `torch.empty` of its output returns a NaN-filled tensor prepared
beforehand) and checked free of NaN after it. Once per case the output is compared with the kernel's torch
reference on the same inputs. Each case's floor is `max(bytes / copy rate, FLOPs / GEMM rate)`, both rates
measured on the same device (a 1 GiB device-to-device copy, an 8192^3 bf16 matmul); `pct_floor` is floor / time.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import Timer, copy_rate_gbps, device_info, gemm_rate_tflops, paged_inputs  # noqa: E402

from cognica_kernels import attention, relu2, token_pool  # noqa: E402

# The model's attention shapes (shared/spec/model.md); the dry run shrinks them for the interpreter.
GPU_PROFILE = {
    "heads": 12, "head_dim": 128, "window_left": 512, "page": 16, "decode_batches": (1, 32, 256),
    "decode_ctxs": (512, 2048), "prefill": (8, 2048, (512, 2048)), "reps": 20, "warmup": 3, "copy_bytes": 1 << 30,
    "gemm_rate_n": 8192,
}  # fmt: skip
DRY_PROFILE = {
    "heads": 2, "head_dim": 64, "window_left": 32, "page": 16, "decode_batches": (1, 3), "decode_ctxs": (40,),
    "prefill": (2, 48, (16, 48)), "reps": 1, "warmup": 1, "copy_bytes": 1 << 20, "gemm_rate_n": 128,
}  # fmt: skip
DTYPE = torch.bfloat16
# (atol, rtol), atol relative to the largest reference output: attention over 2048 random keys averages V down to
# ~0.03, where an absolute 2e-2 (tests/kernels/test_kernels.py's BF16) would pass a kernel that read the wrong keys.
ATTN_TOL = (2e-2, 2e-2)


@dataclass
class KernelCase:
    """One row of the kernel table (the JSON `kernels` list holds these fields)."""

    name: str
    ms: float = math.nan  # Triton, median
    bytes: int = 0  # unique bytes the op must move (inputs read once, output written once)
    flops: int = 0
    gbps: float = math.nan  # bytes / ms
    pct_copy: float = math.nan  # gbps / measured copy rate
    tflops: float = math.nan
    pct_floor: float = math.nan  # max(bytes / copy rate, flops / GEMM rate) / ms
    max_abs_err: float = math.nan  # vs the torch reference, same inputs
    poisoned_runs: int = 0  # timed runs whose output memory was NaN-poisoned before the launch
    reps: int = 0
    ok: bool = False
    error: str | None = None
    times_ms: list[float] = field(default_factory=list)


class _PoisonedTorch:
    """Stands in for `torch` in a launcher's module during one run: the launcher's output allocations
    (`torch.empty` / `empty_like` of the output's shape and dtype) get the NaN-filled tensors prepared before the
    run; every other attribute is torch's."""

    def __init__(self, ready: list[torch.Tensor]):
        self._ready = ready
        self.handed: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype | None) -> torch.Tensor | None:
        if self._ready and tuple(self._ready[0].shape) == shape and self._ready[0].dtype == dtype:
            self.handed.append(self._ready.pop(0))
            return self.handed[-1]
        return None

    def empty_like(self, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        got = self._take(tuple(t.shape), kwargs.get("dtype") or t.dtype) if not args else None
        return got if got is not None else torch.empty_like(t, *args, **kwargs)

    def empty(self, *size, **kwargs) -> torch.Tensor:
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        got = self._take(tuple(shape), kwargs.get("dtype") or torch.get_default_dtype())
        return got if got is not None else torch.empty(*size, **kwargs)


class Poison:
    """Before a run, `count` NaN-filled tensors of the output's shape (one per launch); during it the launcher's
    module allocates its outputs from them (`_PoisonedTorch`); after it, every output must be one of them and
    hold no NaN: every element was written. The stand-in costs a few microseconds of Python per launch."""

    def __init__(self, module: types.ModuleType, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 count: int = 1):  # fmt: skip
        self.module, self.shape, self.dtype, self.device, self.count = module, shape, dtype, device, count
        self.proxy = _PoisonedTorch([])
        self.landed = 0

    def prepare(self) -> None:
        ready = [torch.full(self.shape, float("nan"), dtype=self.dtype, device=self.device) for _ in range(self.count)]
        self.proxy = _PoisonedTorch(ready)

    def run(self, fn: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
        self.module.torch = self.proxy
        try:
            return fn()
        finally:
            self.module.torch = torch

    def check(self, outs: list[torch.Tensor]) -> None:
        handed = {t.data_ptr() for t in self.proxy.handed}
        self.landed += len(outs) == self.count and all(o.data_ptr() in handed for o in outs)
        if any(o.isnan().any() for o in outs):
            raise AssertionError("output still holds NaN after the launch: some elements were never written")


def _time_case(
    case: KernelCase, timer: Timer, profile: dict, module: types.ModuleType, out_shape: tuple[int, ...],
    refresh: Callable[[], None], run: Callable[[], list[torch.Tensor]], launches: int = 1,
) -> None:
    poison = Poison(module, out_shape, DTYPE, timer.device, launches)

    def prepare() -> None:
        refresh()
        poison.prepare()

    case.ms, case.times_ms = timer.median_ms(lambda: poison.run(run), profile["reps"], profile["warmup"], prepare,
                                             poison.check)  # fmt: skip
    case.reps, case.poisoned_runs = profile["reps"], poison.landed


def _finish(case: KernelCase, rates: dict[str, float], tol_ok: bool) -> None:
    seconds = case.ms * 1e-3
    case.gbps = case.bytes / seconds / 1e9
    case.pct_copy = 100 * case.gbps / rates["copy_gbps"]
    case.tflops = case.flops / seconds / 1e12
    floor = max(case.bytes / (rates["copy_gbps"] * 1e9), case.flops / (rates["gemm_tflops"] * 1e12))
    case.pct_floor = 100 * floor / seconds
    if case.poisoned_runs != case.reps:
        case.error = f"only {case.poisoned_runs}/{case.reps} runs wrote into the poisoned outputs: 'written' unchecked"
    elif not tol_ok:
        case.error = f"output differs from the torch reference (max abs err {case.max_abs_err:.3g})"
    case.ok = case.error is None


def _attention_work(batch: int, first: int, q_len: int, window_left: int | None, profile: dict) -> tuple[int, int]:
    """(unique bytes, FLOPs) of a step of `q_len` queries at positions first.. per sequence."""
    heads, dim, elt = profile["heads"], profile["head_dim"], DTYPE.itemsize
    w = math.inf if window_left is None else window_left
    lo, seq_len = max(0, first - w), first + q_len
    keys_loaded = seq_len - lo
    visible = sum(min(t + 1, w + 1) for t in range(first, seq_len))  # keys each query attends to
    kv = batch * keys_loaded * heads * dim * 2 * elt
    qo = 2 * batch * q_len * heads * dim * elt
    return int(kv + qo), int(4 * heads * dim * visible * batch)


def attention_cases(profile: dict, timer: Timer, rates: dict[str, float], writer: RowWriter) -> list[KernelCase]:
    device, out = timer.device, []
    scale = profile["head_dim"] ** -0.5
    shapes = [("decode", b, ctx, 1, ctx) for b in profile["decode_batches"] for ctx in profile["decode_ctxs"]]
    n_seq, prefill_len, chunks = profile["prefill"]
    shapes += [("prefill", n_seq, prefill_len, chunk, prefill_len) for chunk in chunks]
    for kind, batch, ctx, q_len, total in shapes:
        for layer, window in (("S", profile["window_left"]), ("L", None)):
            name = (f"attn decode {layer} b={batch} ctx={ctx}" if kind == "decode"
                    else f"attn prefill {layer} {batch}x{total} chunk={q_len}")  # fmt: skip
            case = KernelCase(name)
            out.append(case)
            print(f"  {name}", flush=True)
            try:
                _attention_case(case, kind, batch, total, q_len, window, scale, profile, timer, rates, device)
            except Exception as e:  # one failing case must not hide the others' numbers
                case.error = f"{type(e).__name__}: {e}"
                print(f"    FAILED: {case.error}", flush=True)
            writer.add(asdict(case))
    return out


def _attention_case(
    case: KernelCase, kind: str, batch: int, total: int, q_len: int, window: int | None, scale: float,
    profile: dict, timer: Timer, rates: dict[str, float], device: torch.device,
) -> None:
    # decode: one step at the end of `total` keys; prefill: the whole of `total` tokens in chunks of `q_len`
    starts = [total - 1] if kind == "decode" else list(range(0, total, q_len))
    steps = []
    for i, first in enumerate(starts):
        q, kc, vc, bt, sl, qsl = paged_inputs(batch, total, q_len, profile["heads"], profile["head_dim"],
                                              profile["page"], device, seed=1000 + i, dtype=DTYPE)  # fmt: skip
        sl = torch.full_like(sl, first + q_len)  # the chunk's keys are already in the cache, later ones unseen
        steps.append((q, kc, vc, bt, sl, qsl, first + q_len))
    case.bytes = case.flops = 0
    for _, _, _, _, _, _, seq_len in steps:
        b, f = _attention_work(batch, seq_len - q_len, q_len, window, profile)
        case.bytes, case.flops = case.bytes + b, case.flops + f
    state: dict[str, list[torch.Tensor]] = {}

    def refresh() -> None:
        state["q"] = [torch.randn_like(s[0]) for s in steps]

    def run() -> list[torch.Tensor]:
        return [
            attention.paged_attention_triton(
                q, kc, vc, bt, sl, qsl, scale, window, max_query_len=q_len, max_seq_len=seq_len
            )
            for q, (_, kc, vc, bt, sl, qsl, seq_len) in zip(state["q"], steps)
        ]

    out_shape = (batch * q_len, profile["heads"], profile["head_dim"])
    _time_case(case, timer, profile, attention, out_shape, refresh, run, launches=len(steps))
    err = 0.0
    ok = True
    atol, rtol = ATTN_TOL
    for q, kc, vc, bt, sl, qsl, seq_len in steps:
        got = attention.paged_attention_triton(q, kc, vc, bt, sl, qsl, scale, window, max_query_len=q_len,
                                               max_seq_len=seq_len)  # fmt: skip
        ref = attention.paged_attention_reference(q, kc, vc, bt, sl, qsl, scale, window)
        diff = (got.float() - ref.float()).abs()
        err = max(err, float(diff.max()))
        ok &= bool((diff <= atol * ref.float().abs().max() + rtol * ref.float().abs()).all())
    case.max_abs_err = err
    _finish(case, rates, ok)


def _report_row(row: dict, writer) -> None:
    """Print a timed row's summary (ours and each peer, microseconds) and write it to the JSON as it finishes."""
    print(f"    ours {_fmt(row['ours_us'], '8.1f')} us ok={row['ours_ok']}; "
          + " ".join(f"{n} {_fmt(v['us'], '8.1f')}" for n, v in row["peers"].items()), flush=True)
    writer.add(row)


def run_kernels(out_path: Path, dry_run: bool) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    profile = DRY_PROFILE if dry_run else GPU_PROFILE
    timer = Timer(device)
    t0 = time.time()
    rates = {
        "cuda": device.type == "cuda",
        "copy_gbps": copy_rate_gbps(timer, profile["copy_bytes"]),
        "gemm_tflops": gemm_rate_tflops(timer, profile["gemm_rate_n"], DTYPE),
    }
    print(f"  measured: copy {rates['copy_gbps']:.0f} GB/s, bf16 GEMM {rates['gemm_tflops']:.1f} TFLOP/s", flush=True)
    writer = RowWriter(out_path, {"device": device_info(device), "dry_run": dry_run, "rates": rates}, key="kernels")
    cases = attention_cases(profile, timer, rates, writer)
    writer.header["seconds"] = round(time.time() - t0, 1)
    writer.write(complete=True)
    failed = [c.name for c in cases if not c.ok]
    print(f"  {len(cases) - len(failed)}/{len(cases)} kernel cases ok" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


def _json_default(o: object) -> object:
    return str(o)


# --------------------------------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str) -> str:
    """`format(v, spec)`, or a right-aligned '-' of the same width where there is no number."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-".rjust(int(spec.split(".")[0]))
    return format(v, spec)


# --- side-by-side (issue 19 item 5, issue 29): ours beside the peers a plugin could run instead, identical inputs ---
# decode b x 1 query; prefill n x T tokens (vLLM's layout, and SGLang's token pool: page size 1, req_to_token rows
# of 2052 slots); mixed: b decode rows and one chunk in one launch, as vLLM batches them. relu^2 alone on [M, 6144].
COMPARE_GPU = {"heads": 12, "head_dim": 128, "window_left": 512, "page": 16, "ctx": 2048, "batches": (1, 32, 256),
               "prefill": (4, 2048), "mixed": (32, 512), "sglang_ctx_cols": 2052, "relu2_n": 6144,
               "relu2_ms": {"decode": (1, 32, 256), "prefill": (8192,)}, "launches": 20, "replays": 7,
               "rotate_bytes": 128 << 20, "max_copies": 64, "max_input_bytes": 8 << 30}  # fmt: skip
COMPARE_DRY = {"heads": 2, "head_dim": 64, "window_left": 32, "page": 16, "ctx": 64, "batches": (1, 4),
               "prefill": (2, 64), "mixed": (3, 16), "sglang_ctx_cols": 68, "relu2_n": 256,
               "relu2_ms": {"decode": (1,), "prefill": (32,)}, "launches": 1, "replays": 5,
               "rotate_bytes": 1 << 16, "max_copies": 2, "max_input_bytes": 1 << 30}  # fmt: skip
MIN_REPEATS = 5  # graph replays behind every median the verdict reads


def launch_us(fns: list[Callable[[], object]], launches: int, replays: int, cuda: bool,
              timed: bool = True) -> tuple[float | None, str, list[float]]:  # fmt: skip
    """(median µs per launch, method, every replay's µs per launch). CUDA: one graph of `launches` back-to-back calls
    rotated over `fns` (input copies whose reads together exceed L2), replayed `replays` times, so host overhead is
    out. CPU (dry run): `launches` plain calls per repeat, perf_counter; the times mean nothing. `timed=False`
    (the warm step) only runs each function once: compiles, autotuning, allocator pools."""
    for fn in fns:  # warm-up: compiles, autotunes, allocator pools
        fn()
    if not timed:
        return None, "warm-up only", []
    times = []
    if not cuda:
        for _ in range(replays):
            t0 = time.perf_counter()
            for i in range(launches):
                fns[i % len(fns)]()
            times.append((time.perf_counter() - t0) * 1e6 / launches)
        return statistics.median(times), "plain (CPU)", times
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(launches):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / launches)
    return statistics.median(times), "cuda-graph replay", times


def rotation_copies(bytes_read: int, p: dict, bytes_allocated: int) -> int:
    """Input copies a row rotates over: enough that the bytes its launches read between two uses of one copy exceed
    `rotate_bytes` (more than L2), sized by what one launch READS (an S layer's window, not the whole cache), at
    most `max_copies` and `max_input_bytes` of allocations."""
    want = -(-p["rotate_bytes"] // max(1, bytes_read))
    by_memory = max(1, p["max_input_bytes"] // max(1, bytes_allocated))
    return max(1, min(want, p["max_copies"], by_memory))


def _gather(cache: torch.Tensor, block_table: torch.Tensor, ctx: int) -> torch.Tensor:
    """[batch, heads, ctx, hd] contiguous keys (or values) of each sequence, in order (untimed)."""
    b = block_table.shape[0]
    return cache[block_table.long()].reshape(b, -1, cache.shape[2], cache.shape[3])[:, :ctx].transpose(1, 2) \
        .contiguous()  # fmt: skip


def _sdpa_peer(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "math": SDPBackend.MATH}[backend_name]  # fmt: skip

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    return run


def _flex_peer(q_len: int, kv_len: int, window: int | None, device: torch.device, compiled: bool) -> Callable:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    offset = kv_len - q_len  # query i sits at key position offset + i

    def mask(b, h, qi, ki):
        pos = qi + offset
        keep = ki <= pos
        return keep & (pos - ki <= window) if window is not None else keep

    block_mask = create_block_mask(mask, None, None, q_len, kv_len, device=str(device))
    fn = torch.compile(flex_attention) if compiled else flex_attention
    return lambda q, k, v, scale: fn(q, k, v, block_mask=block_mask, scale=scale)


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    diff = (got.float() - ref.float()).abs()
    atol, rtol = ATTN_TOL
    return bool((diff <= atol * ref.float().abs().max() + rtol * ref.float().abs()).all()), float(diff.max())


class RowWriter:
    """A step's JSON (its rows under `key`), rewritten after every row, so a step that runs out of time keeps the
    rows it finished (`complete` stays false until the last one)."""

    def __init__(self, path: Path, header: dict, key: str = "compare"):
        self.path, self.header, self.key, self.rows = path, header, key, []
        self.write(complete=False)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.header, self.key: self.rows, "complete": complete}, indent=1,
                                  default=_json_default) + "\n")  # fmt: skip
        tmp.replace(self.path)


def _new_row(op: str, kind: str, phase: str, size: int, case: str) -> dict:
    return {"op": op, "kind": kind, "phase": phase, "size": size, "case": case, "ours_us": None, "ours_times": [],
            "ours_ok": False, "method": None, "peers": {}, "error": None}  # fmt: skip


def _peer_times(row: dict, name: str, ok_err: tuple[bool, float], fns: list[Callable], p: dict, cuda: bool,
                timed: bool) -> None:  # fmt: skip
    peer: dict = {"us": None, "times": [], "ok": ok_err[0], "err": ok_err[1]}
    row["peers"][name] = peer
    peer["us"], _, peer["times"] = launch_us(fns, p["launches"], p["replays"], cuda, timed)


def attention_shapes(p: dict) -> list[tuple[str, str, int, int, str]]:
    """(kind, phase, batch, query length, layout) of every attention row."""
    shapes = [("decode", "decode", b, 1, "vllm") for b in p["batches"]]
    shapes += [("prefill", "prefill", p["prefill"][0], p["prefill"][1], layout) for layout in ("vllm", "sglang")]
    shapes.append(("mixed", "prefill", p["mixed"][0], p["mixed"][1], "vllm"))
    return shapes


def attention_compare(p: dict, device: torch.device, cuda: bool, writer: RowWriter, timed: bool = True) -> None:
    scale = p["head_dim"] ** -0.5
    peers = ("cudnn", "flash") if cuda else ("math",)
    for kind, phase, batch, q_len, layout in attention_shapes(p):
        for layer, window in (("S", p["window_left"]), ("L", None)):
            case = f"attn {kind} {layer} b={batch} q={q_len} ctx={p['ctx']}" + (" sglang-page1" if layout == "sglang"
                                                                                 else "")  # fmt: skip
            print(f"  {case}", flush=True)
            row = _new_row("attention", kind, phase, batch, case)
            try:
                if kind == "mixed":
                    _mixed_row(row, batch, q_len, window, scale, p, device, cuda, peers, timed)
                else:
                    _attention_row(row, kind, batch, q_len, window, scale, layout, p, device, cuda, peers, timed)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"    FAILED: {row['error']}", flush=True)
            _report_row(row, writer)
            if cuda:
                torch.cuda.empty_cache()


def _sglang_inputs(batch: int, ctx: int, q_len: int, h: int, hd: int, cols: int, device: torch.device, seed: int):
    """SGLang's token pool: k/v pools [slots, h, hd], req_to_token [batch + 1, cols] int32 (row 0 unused, as SGLang
    reserves it; shuffled slots), req_pool_indices, seq_lens, query lens."""
    g = torch.Generator(device=device).manual_seed(seed)
    slots = batch * ctx + 1
    k_pool = torch.randn(slots, h, hd, device=device, dtype=DTYPE, generator=g)
    v_pool = torch.randn(slots, h, hd, device=device, dtype=DTYPE, generator=g)
    req_to_token = torch.zeros(batch + 1, cols, dtype=torch.int32, device=device)
    perm = torch.randperm(batch * ctx, generator=torch.Generator().manual_seed(seed)) + 1
    req_to_token[1:, :ctx] = perm.view(batch, ctx).to(device=device, dtype=torch.int32)
    q = torch.randn(batch * q_len, h, hd, device=device, dtype=DTYPE, generator=g)
    idx = torch.arange(1, batch + 1, device=device)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    qsl = torch.arange(0, batch * q_len + 1, q_len, device=device, dtype=torch.int32)
    return q, k_pool, v_pool, req_to_token, idx, seq_lens, qsl


def _attention_row(row: dict, kind: str, batch: int, q_len: int, window: int | None, scale: float, layout: str,
                   p: dict, device: torch.device, cuda: bool, peers: tuple, timed: bool) -> None:  # fmt: skip
    ctx, h, hd = p["ctx"], p["heads"], p["head_dim"]
    first = 0 if window is None or kind == "prefill" else max(0, ctx - 1 - window)  # first key a decode step reads
    row["bytes_read"] = _attention_work(batch, ctx - q_len, q_len, window, {"heads": h, "head_dim": hd})[0]
    copies = rotation_copies(row["bytes_read"], p, batch * ctx * h * hd * 2 * DTYPE.itemsize)
    row["copies"] = copies
    calls, refs_in, gathered = [], [], []
    for c in range(copies):
        if layout == "sglang":  # as cognica_sglang runs it: block table = this batch's req_to_token rows (copied)
            q, k_pool, v_pool, r2t, idx, sl, qsl = _sglang_inputs(batch, ctx, q_len, h, hd, p["sglang_ctx_cols"],
                                                                  device, 2000 + c)  # fmt: skip
            kc, vc = k_pool.unsqueeze(1), v_pool.unsqueeze(1)
            calls.append(lambda q=q, kc=kc, vc=vc, r2t=r2t, idx=idx, sl=sl, qsl=qsl: attention.paged_attention_triton(
                q, kc, vc, token_pool.block_table_from_req_to_token(r2t, idx), sl, qsl, scale, window,
                max_query_len=q_len, max_seq_len=ctx))  # fmt: skip
            bt = token_pool.block_table_from_req_to_token(r2t, idx)
        else:  # vLLM's KV layout, physical blocks shuffled; max_seq_len = max_model_len as the plugin passes it
            q, kc, vc, bt, sl, qsl = paged_inputs(batch, ctx, q_len, h, hd, p["page"], device, seed=2000 + c,
                                                  dtype=DTYPE, vllm_layout=True)  # fmt: skip
            calls.append(lambda a=(q, kc, vc, bt, sl, qsl): attention.paged_attention_triton(
                *a, scale, window, max_query_len=q_len, max_seq_len=ctx))  # fmt: skip
        if c == 0:
            refs_in = [q, kc, vc, bt, sl, qsl]
        # peers: contiguous gathers of the same in-window keys (not timed), [batch, heads, len, hd]
        k, v = _gather(kc, bt, ctx)[:, :, first:], _gather(vc, bt, ctx)[:, :, first:]
        gathered.append((q.view(batch, q_len, h, hd).transpose(1, 2).contiguous(), k.contiguous(), v.contiguous()))
    ref = attention.paged_attention_reference(*refs_in, scale, window)
    row["ours_ok"], row["ours_err"] = _close(calls[0](), ref)
    row["ours_us"], row["method"], row["ours_times"] = launch_us(calls, p["launches"], p["replays"], cuda, timed)
    causal = kind == "prefill"

    def to_tokens(o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(batch * q_len, h, hd)

    candidates: dict[str, Callable] = {}
    if kind == "decode" or window is None:  # flash / cuDNN take no sliding-window mask here: prefill S is flex only
        for name in peers:
            sdpa = _sdpa_peer(name)
            candidates[f"sdpa_{name}"] = lambda g, s=sdpa: s(g[0], g[1], g[2], causal, scale)
    flex_window = window if kind == "prefill" else None  # decode gathers only in-window keys already
    kv_len = gathered[0][1].shape[2]
    flex = _flex_peer(q_len, kv_len, flex_window, device, cuda)
    candidates["flex_compiled" if cuda else "flex_eager"] = lambda g, f=flex: f(g[0], g[1], g[2], scale)
    for name, fn in candidates.items():
        try:
            ok_err = _close(to_tokens(fn(gathered[0])), ref)
            _peer_times(row, name, ok_err, [lambda g=g, fn=fn: fn(g) for g in gathered], p, cuda, timed)
        except Exception as e:
            row["peers"][name] = {"us": None, "times": [], "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    row["note"] = "peers time attention on a contiguous gather of the in-window keys; the gather is not timed"


def _mixed_row(row: dict, n_decode: int, chunk: int, window: int | None, scale: float, p: dict,
               device: torch.device, cuda: bool, peers: tuple, timed: bool) -> None:  # fmt: skip
    """`n_decode` sequences at one query each and one chunk of `chunk` queries ending at ctx in one call of ours, as
    vLLM batches a mixed step (the launcher sends the one-query rows to the decode tile with split-K and the chunk to
    the prefill tile); a peer runs the two parts on gathered keys: its decode peer for the decode rows (sdpa_*, or
    flex) and flex for the chunk (SDPA's causal mask is top-left aligned, wrong for a chunk after a prefix)."""
    ctx, h, hd = p["ctx"], p["heads"], p["head_dim"]
    batch = n_decode + 1
    dec_bytes = _attention_work(n_decode, ctx - 1, 1, window, {"heads": h, "head_dim": hd})[0]
    row["bytes_read"] = dec_bytes + _attention_work(1, ctx - chunk, chunk, window, {"heads": h, "head_dim": hd})[0]
    copies = rotation_copies(row["bytes_read"], p, batch * ctx * h * hd * 2 * DTYPE.itemsize)
    row["copies"] = copies
    qlens = torch.tensor([1] * n_decode + [chunk], dtype=torch.int32)
    qsl = torch.nn.functional.pad(qlens.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    calls, gathered, refs_in = [], [], []
    first_dec = 0 if window is None else max(0, ctx - 1 - window)
    first_chunk = 0 if window is None else max(0, ctx - chunk - window)
    for c in range(copies):
        _, kc, vc, bt, sl, _ = paged_inputs(batch, ctx, 1, h, hd, p["page"], device, seed=3000 + c, dtype=DTYPE,
                                            vllm_layout=True)  # fmt: skip
        q = torch.randn(n_decode + chunk, h, hd, device=device, dtype=DTYPE)
        args = (q, kc, vc, bt, sl, qsl)
        calls.append(lambda a=args: attention.paged_attention_triton(*a, scale, window, max_query_len=chunk,
                                                                     max_seq_len=ctx))  # fmt: skip
        if c == 0:
            refs_in = list(args)
        k, v = _gather(kc, bt, ctx), _gather(vc, bt, ctx)
        qd = q[:n_decode].view(n_decode, 1, h, hd).transpose(1, 2).contiguous()
        qc = q[n_decode:].view(1, chunk, h, hd).transpose(1, 2).contiguous()
        gathered.append((qd, k[:n_decode, :, first_dec:].contiguous(), v[:n_decode, :, first_dec:].contiguous(),
                         qc, k[n_decode:, :, first_chunk:].contiguous(), v[n_decode:, :, first_chunk:].contiguous()))
    ref = attention.paged_attention_reference(*refs_in, scale, window)
    row["ours_ok"], row["ours_err"] = _close(calls[0](), ref)
    row["ours_us"], row["method"], row["ours_times"] = launch_us(calls, p["launches"], p["replays"], cuda, timed)
    chunk_flex = _flex_peer(chunk, gathered[0][4].shape[2], window, device, cuda)
    dec_flex = _flex_peer(1, gathered[0][1].shape[2], None, device, cuda)
    sdpas = {n: _sdpa_peer(n) for n in peers}
    decoders: dict[str, Callable] = {f"sdpa_{n}": (lambda q, k, v, s=s: s(q, k, v, False, scale))
                                     for n, s in sdpas.items()}  # fmt: skip
    decoders["flex"] = lambda q, k, v: dec_flex(q, k, v, scale)

    def to_tokens(od: torch.Tensor, oc: torch.Tensor) -> torch.Tensor:
        return torch.cat([od.transpose(1, 2).reshape(n_decode, h, hd), oc.transpose(1, 2).reshape(chunk, h, hd)])

    for name, dec in decoders.items():
        def both(g: tuple, dec: Callable = dec) -> tuple[torch.Tensor, torch.Tensor]:
            return dec(g[0], g[1], g[2]), chunk_flex(g[3], g[4], g[5], scale)

        peer_name = f"{name}+flex" if name != "flex" else ("flex_compiled" if cuda else "flex_eager")
        try:
            ok_err = _close(to_tokens(*both(gathered[0])), ref)
            _peer_times(row, peer_name, ok_err, [lambda g=g, f=both: f(g) for g in gathered], p, cuda, timed)
        except Exception as e:
            row["peers"][peer_name] = {"us": None, "times": [], "ok": False,
                                       "error": f"{type(e).__name__}: {str(e)[:200]}"}  # fmt: skip
    row["note"] = "ours: one call for the whole mixed batch; peers: two launches on gathered keys (not timed)"


def relu2_compare(p: dict, device: torch.device, cuda: bool, writer: RowWriter, timed: bool = True) -> None:
    """relu^2 alone on the MLP's [M, 6144] pre-activation: ours against torch eager and (CUDA) torch.compile of
    `relu(x).square()`, the op Inductor fuses inside the engines' graphs."""
    n = p["relu2_n"]
    paths: dict[str, Callable] = {"eager": lambda x: torch.relu(x).square()}
    if cuda:
        paths["compiled"] = torch.compile(lambda x: torch.relu(x).square())
    for phase, ms in p["relu2_ms"].items():
        for m in ms:
            case = f"relu2 M={m} N={n}"
            print(f"  {case}", flush=True)
            row = _new_row("relu2", "relu2", phase, m, case)
            try:
                row["bytes_read"] = m * n * DTYPE.itemsize
                copies = rotation_copies(row["bytes_read"], p, 2 * m * n * DTYPE.itemsize)
                row["copies"] = copies
                xs = [torch.randn(m, n, device=device, dtype=DTYPE) for _ in range(copies)]
                ref = relu2.relu2_reference(xs[0])
                got = relu2.relu2_triton(xs[0])
                row["ours_ok"] = bool(torch.allclose(got.float(), ref.float(), atol=1e-6, rtol=1e-2))
                row["ours_err"] = float((got.float() - ref.float()).abs().max())
                row["ours_us"], row["method"], row["ours_times"] = launch_us(
                    [lambda x=x: relu2.relu2_triton(x) for x in xs], p["launches"], p["replays"], cuda, timed)
                for name, act in paths.items():
                    out = act(xs[0])
                    ok_err = (bool(torch.allclose(out.float(), ref.float(), atol=0, rtol=1e-2)),
                              float((out.float() - ref.float()).abs().max()))  # fmt: skip
                    _peer_times(row, name, ok_err, [lambda x=x, f=act: f(x) for x in xs], p, cuda, timed)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"    FAILED: {row['error']}", flush=True)
            _report_row(row, writer)


def warm_kernel_cases(profile: dict, device: torch.device) -> int:
    """The warm step's share of the kernels step: every launch configuration its cases use, run once on small
    inputs of the same compile-time shape (the Triton compiles land in the on-disk cache); returns the launches."""
    scale, launches = profile["head_dim"] ** -0.5, 0
    n_seq, prefill_len, chunks = profile["prefill"]
    shapes = [(b, 1, ctx) for b in profile["decode_batches"] for ctx in profile["decode_ctxs"]]
    shapes += [(n_seq, chunk, prefill_len) for chunk in chunks]
    for batch, q_len, total in shapes:
        for window in (profile["window_left"], None):
            q, kc, vc, bt, sl, qsl = paged_inputs(batch, total, q_len, profile["heads"], profile["head_dim"],
                                                  profile["page"], device, seed=0, dtype=DTYPE)  # fmt: skip
            for first in sorted({total - q_len, 0}) if q_len > 1 else (total - 1,):  # chunk lengths seen
                attention.paged_attention_triton(q, kc, vc, bt, torch.full_like(sl, first + q_len), qsl, scale,
                                                 window, max_query_len=q_len, max_seq_len=first + q_len)  # fmt: skip
                launches += 1
    return launches


def run_compare(out_path: Path, dry_run: bool, warm: bool = False) -> int:
    """The compare step (`warm`: the warm step, every row built and each path run once, nothing timed, so the
    compiles land in Triton's and Inductor's on-disk caches before the timed step)."""
    device = torch.device("cpu" if dry_run else "cuda")
    cuda = device.type == "cuda"
    p = COMPARE_DRY if dry_run else COMPARE_GPU
    torch.manual_seed(0)
    t0 = time.time()
    writer = RowWriter(out_path, {"device": device_info(device), "profile": p, "warm_only": warm})
    attention_compare(p, device, cuda, writer, timed=not warm)
    relu2_compare(p, device, cuda, writer, timed=not warm)
    if warm:  # and the kernels step's launch configurations
        writer.header["kernel_launches"] = warm_kernel_cases(DRY_PROFILE if dry_run else GPU_PROFILE, device)
    writer.header["seconds"] = round(time.time() - t0, 1)
    writer.write(complete=True)
    bad = [r["case"] for r in writer.rows if r["error"]]
    print(f"{'warm' if warm else 'compare'}: {len(writer.rows)} rows, {len(bad)} errors {bad or ''}")
    return 1 if bad else 0


# The verdict (issue 29): ours ("triton") for an op and a phase only where, at every row of that phase, ours was
# faster than every peer that passed its cross-check: median of >= MIN_REPEATS graph replays, and the gap between the
# medians larger than the spread (max - min) of either side's replays. Every cross-check of ours must pass, and a row
# with no counting peer or too few repeats gives "engine".
VERDICT_OPS = {"attention": ("decode", "prefill"), "relu2": ("decode", "prefill")}


def _spread(times: list[float]) -> float:
    return max(times) - min(times)


def row_verdict(row: dict) -> tuple[bool, str]:
    """(ours faster than every counting peer by more than the spread, why) for one side-by-side row."""
    if row.get("error"):
        return False, f"{row['case']}: {row['error']}"
    if not row["ours_ok"]:
        return False, f"{row['case']}: our cross-check failed"
    ours = row.get("ours_times") or []
    if len(ours) < MIN_REPEATS:
        return False, f"{row['case']}: ours timed {len(ours)} times (< {MIN_REPEATS})"
    peers = {n: p for n, p in row["peers"].items() if p.get("ok") and p.get("times")}
    if not peers:
        return False, f"{row['case']}: no peer passed its cross-check"
    ours_med = statistics.median(ours)
    closest = (math.inf, "")
    for name, peer in peers.items():
        if len(peer["times"]) < MIN_REPEATS:
            return False, f"{row['case']}: {name} timed {len(peer['times'])} times (< {MIN_REPEATS})"
        peer_med = statistics.median(peer["times"])
        gap, spread = peer_med - ours_med, max(_spread(ours), _spread(peer["times"]))
        if gap <= spread:
            verb = "slower than" if gap < 0 else "within the spread of"
            return False, (f"{row['case']}: ours {ours_med:.1f} us {verb} {name} {peer_med:.1f} us "
                           f"(gap {gap:.1f} us, spread {spread:.1f} us)")  # fmt: skip
        closest = min(closest, (gap - spread, f"{name} {peer_med:.1f} us, gap {gap:.1f} > spread {spread:.1f} us"))
    return True, f"{row['case']}: ours {ours_med:.1f} us, closest {closest[1]}"


def verdict(op: str, phase: str, rows: list[dict]) -> dict[str, str]:
    """{"verdict": "triton" | "engine", "reason": ...} for `op` in `phase` from side-by-side rows (`row_verdict`)."""
    mine = [r for r in rows if r.get("op") == op and r.get("phase") == phase]
    if not mine:
        return {"verdict": "engine", "reason": "no side-by-side row measured"}
    reasons = []
    for r in mine:
        faster, why = row_verdict(r)
        if not faster:
            return {"verdict": "engine", "reason": why}
        reasons.append(why)
    return {"verdict": "triton", "reason": f"faster at all {len(mine)} rows; e.g. {reasons[0]}"}


def verdicts(env: dict, rows: list[dict]) -> dict[str, object]:
    """The `verdicts` object of gpu_check.json: the GPU's name and capability, one verdict per op and phase, keyed
    as `MEASURED_FASTER` in kernels/cognica_kernels/dispatch.py."""
    return {"gpu": env.get("name", "?"), "capability": env.get("capability", "?"),
            **{op: {phase: verdict(op, phase, rows) for phase in phases} for op, phases in VERDICT_OPS.items()}}


def _half_spread(times: list[float] | None) -> str:
    return f" +-{_spread(times) / 2:.1f}" if times else ""


def kernel_tests(junit_xml: Path, pytest_info: dict | None) -> dict[str, object] | None:
    """The `kernel_tests` object of gpu_check.json from the kernel-tests step's JUnit XML (pytest --junitxml):
    which pytest ran them (the env step's `pytest`), counts, the failing test ids, seconds. None: no XML."""
    if not junit_xml.exists():
        return None
    failures, counts = [], {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    seconds = 0.0
    for suite in ElementTree.parse(junit_xml).getroot().iter("testsuite"):
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        seconds += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failures.append(f"{case.get('classname')}::{case.get('name')}")
    info = pytest_info or {}
    failed = counts["failures"] + counts["errors"]
    return {"runner": f"pytest {info.get('version', '?')} from {info.get('from', '?')}",
            "passed": counts["tests"] - failed - counts["skipped"], "failed": failed, "skipped": counts["skipped"],
            "failures": sorted(failures), "seconds": round(seconds, 1)}  # fmt: skip


def report(out_dir: Path) -> int:
    """Merge the step files into OUT/gpu_check.json and print the summary table; non-zero if anything failed."""
    parts: dict[str, object] = {}
    for name in ("env", "warm", "kernels", "compare", "decode"):
        path = out_dir / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else None
    parts["kernel_tests"] = kernel_tests(out_dir / "kernel_tests.xml", (parts["env"] or {}).get("pytest"))
    steps = {}
    if (out_dir / "steps.tsv").exists():  # written by run.sh: name, exit code, seconds
        for line in (out_dir / "steps.tsv").read_text().splitlines():
            name, rc, seconds = line.split("\t")
            steps[name] = {"rc": int(rc), "seconds": int(seconds)}
    compare = (parts["compare"] or {}).get("compare", []) if isinstance(parts["compare"], dict) else []
    verdict_table = verdicts(parts["env"] or {}, compare)
    summary = {**parts, "steps": steps, "verdicts": verdict_table,
               "ok": bool(steps) and all(s["rc"] == 0 for s in steps.values())}  # fmt: skip
    (out_dir / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")

    env = parts["env"] or {}
    print(f"\n=== GPU check: {env.get('name', '?')} | torch {env.get('torch')} | triton {env.get('triton')} | "
          f"{'DRY RUN (CPU, interpreter): times mean nothing' if env.get('dry_run') else 'compiled'}")  # fmt: skip
    for step, s in steps.items():
        print(f"  step {step:<20} exit {s['rc']:>3}  {s['seconds']:>5} s")
    tests = parts["kernel_tests"]
    if tests:
        print(f"  kernel tests ({tests['runner']}): {tests['passed']} passed, {tests['failed']} failed, "
              f"{tests['skipped']} skipped {tests['failures'] or ''}")  # fmt: skip
    kern = parts["kernels"]
    if kern:
        r = kern["rates"]
        print(f"\nkernels (bf16; floor = max(bytes / copy {r['copy_gbps']:.0f} GB/s, FLOPs / GEMM "
              f"{r['gemm_tflops']:.1f} TFLOP/s))")  # fmt: skip
        print(f"{'case':<40} {'ms':>8} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%floor':>7} "
              f"{'max err':>8} ok")  # fmt: skip
        for c in kern["kernels"]:
            print(f"{c['name']:<40} {_fmt(c['ms'], '8.3f')} {_fmt(c['gbps'], '7.0f')} "
                  f"{_fmt(c['pct_copy'], '6.0f')} {_fmt(c['tflops'], '8.1f')} {_fmt(c['pct_floor'], '7.0f')} "
                  f"{_fmt(c['max_abs_err'], '8.1e')} {'yes' if c['ok'] else 'NO: ' + str(c['error'])}")  # fmt: skip
    dec = parts["decode"]
    if dec:
        print(f"\nwhole-model decode step ({dec['model']}, bf16, paged KV, ctx {dec['ctx']}): parity "
              f"fp32 {'ok' if dec['parity_fp32']['ok'] else 'FAILED'}, bf16 "
              f"{'ok' if dec['parity_bf16']['ok'] else 'FAILED'}")  # fmt: skip
        print(f"{'windows':<9} {'ops':<8} {'batch':>5} {'graph':>6} {'ms/step':>8} {'tok/s':>9} {'eager tok/s':>11} "
              f"{'%roofline':>9} {'%copy-roof':>10} {'KV GB':>6} note")  # fmt: skip
        for row in dec["rows"]:
            graph = "yes" if row["graph"] else "no"
            print(f"{row['windows']:<9} {row.get('ops', 'opt-in'):<8} {row['batch']:>5} {graph:>6} "
                  f"{_fmt(row['ms'], '8.3f')} {_fmt(row['tok_s'], '9.0f')} {_fmt(row['eager_tok_s'], '11.0f')} "
                  f"{_fmt(row['pct_roofline'], '9.0f')} {_fmt(row['pct_copy_roofline'], '10.0f')} "
                  f"{_fmt(row['kv_gb'], '6.1f')} {row['note'] or ''}")  # fmt: skip
    if compare:
        done = "" if (parts["compare"] or {}).get("complete") else " -- INCOMPLETE: the step stopped early"
        print(f"\nside by side (µs per launch, median of the replays +- half their spread; (x): cross-check "
              f"failed){done}")  # fmt: skip
        for row in compare:
            peers = "  ".join(f"{n} {_fmt(v.get('us'), '6.1f')}{_half_spread(v.get('times'))}"
                              f"{'' if v.get('ok') else ' (x)'}" for n, v in row["peers"].items())  # fmt: skip
            print(f"  {row['case']:<48} [{row.get('phase', '?')}] ours {_fmt(row['ours_us'], '6.1f')}"
                  f"{_half_spread(row.get('ours_times'))}{'' if row['ours_ok'] else ' (x)'}  {peers}  "
                  f"{row['error'] or ''}")  # fmt: skip
    print(f"\nverdicts ({verdict_table['gpu']}, capability {verdict_table['capability']}; \"triton\" means: add "
          "this GPU name to MEASURED_FASTER[op][phase] in kernels/cognica_kernels/dispatch.py; \"engine\": leave it "
          "out)")  # fmt: skip
    for op, phases in VERDICT_OPS.items():
        for phase in phases:
            v = verdict_table[op][phase]
            print(f"  {op:<10} {phase:<8} {v['verdict']:<7} {v['reason']}")
    print(f"\nfull results: {out_dir / 'gpu_check.json'}")
    print(f"=== GPU check: {'PASSED' if summary['ok'] else 'FAILED'}")
    return 0 if summary["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="time the kernels, write JSON")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    for name, what in (("compare", "ours beside the peers on identical inputs, write JSON row by row"),
                       ("warm", "build every compare row and run each path once, untimed: compiles into the caches")):
        c = sub.add_parser(name, help=what)
        c.add_argument("--out", type=Path, required=True)
        c.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    r = sub.add_parser("report", help="merge the step files of OUT and print the table")
    r.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    if args.cmd in ("compare", "warm"):
        return run_compare(args.out, args.dry_run, warm=args.cmd == "warm")
    return run_kernels(args.out, args.dry_run) if args.cmd == "kernels" else report(args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
