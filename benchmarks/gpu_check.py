"""Kernel timings of the GPU check, and its final report. Run by `scripts/gpu_check.sh`, which documents the whole.

    python benchmarks/gpu_check.py kernels --out OUT/kernels.json [--dry-run]
    python benchmarks/gpu_check.py report OUT          # prints the table, writes OUT/gpu_check.json

Each case times one of our Triton launchers (`cognica_kernels.attention.paged_attention_triton`, and
`relu2_linear_triton` of benchmarks/relu2_linear.py, a fused c_fc + relu^2 candidate no plugin runs, against the
product's `F.linear` + relu^2) in bf16: the median of CUDA-event intervals after warm-up, L2 flushed and fresh
random queries / activations before every timed run, and the output poisoned before every run (the launcher's
`torch.empty` of its output returns a NaN-filled tensor prepared beforehand) and checked free of
NaN after it. Once per case the output is compared with the kernel's torch
reference on the same inputs. Each case's floor is `max(bytes / copy rate, FLOPs / GEMM rate)`, both rates
measured on the same device (a 1 GiB device-to-device copy, an 8192^3 bf16 matmul); `pct_floor` is floor / time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relu2_linear  # noqa: E402
from gpu_timing import Timer, copy_rate_gbps, device_info, gemm_rate_tflops, paged_inputs  # noqa: E402

from cognica_kernels import attention, relu2  # noqa: E402

# The model's attention and MLP shapes (shared/spec/model.md); the dry run shrinks them for the interpreter.
GPU_PROFILE = {
    "heads": 12, "head_dim": 128, "window_left": 512, "page": 16, "decode_batches": (1, 32, 256),
    "decode_ctxs": (512, 2048), "prefill": (8, 2048, (512, 2048)), "gemm_kn": (1536, 6144),
    "gemm_ms": (1, 32, 256, 8 * 2048), "reps": 20, "warmup": 3, "copy_bytes": 1 << 30, "gemm_rate_n": 8192,
}  # fmt: skip
DRY_PROFILE = {
    "heads": 2, "head_dim": 64, "window_left": 32, "page": 16, "decode_batches": (1, 3), "decode_ctxs": (40,),
    "prefill": (2, 48, (16, 48)), "gemm_kn": (128, 512), "gemm_ms": (1, 20), "reps": 1, "warmup": 1,
    "copy_bytes": 1 << 20, "gemm_rate_n": 128,
}  # fmt: skip
DTYPE = torch.bfloat16
# (atol, rtol), atol relative to the largest reference output: attention over 2048 random keys averages V down to
# ~0.03, where an absolute 2e-2 (tests/test_kernels.py's BF16) would pass a kernel that read the wrong keys.
ATTN_TOL = (2e-2, 2e-2)
GEMM_TOL = (5e-2, 3e-2)  # as tests/test_kernels.py's bf16 relu2_linear


@dataclass
class KernelCase:
    """One row of the kernel table (the JSON `kernels` list holds these fields)."""

    name: str
    ms: float = math.nan  # Triton, median
    torch_ms: float | None = None  # F.linear + relu^2 (relu2_linear only)
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


def attention_cases(profile: dict, timer: Timer, rates: dict[str, float]) -> list[KernelCase]:
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


def gemm_cases(profile: dict, timer: Timer, rates: dict[str, float]) -> list[KernelCase]:
    device, out = timer.device, []
    k, n = profile["gemm_kn"]
    g = torch.Generator(device=device).manual_seed(7)
    w = (torch.randn(n, k, device=device, dtype=DTYPE, generator=g) / 40).contiguous()
    for m in profile["gemm_ms"]:
        case = KernelCase(f"relu2_linear M={m} K={k} N={n}")
        out.append(case)
        print(f"  {case.name}", flush=True)
        try:
            _gemm_case(case, m, w, g, profile, timer, rates)
        except Exception as e:
            case.error = f"{type(e).__name__}: {e}"
            print(f"    FAILED: {case.error}", flush=True)
    return out


def _gemm_case(
    case: KernelCase, m: int, w: torch.Tensor, g: torch.Generator, profile: dict, timer: Timer, rates: dict[str, float]
) -> None:
    n, k = w.shape
    state: dict[str, torch.Tensor] = {}

    def refresh() -> None:
        state["x"] = torch.randn(m, k, device=timer.device, dtype=DTYPE)

    case.bytes = (m * k + n * k + m * n) * DTYPE.itemsize
    case.flops = 2 * m * n * k
    _time_case(case, timer, profile, relu2_linear, (m, n), refresh,
               lambda: [relu2_linear.relu2_linear_triton(state["x"], w)])
    case.torch_ms, _ = timer.median_ms(
        lambda: relu2_linear.relu2_linear_reference(state["x"], w), profile["reps"], profile["warmup"], refresh
    )
    x = torch.randn(m, k, device=timer.device, dtype=DTYPE, generator=g)
    got, ref = relu2_linear.relu2_linear_triton(x, w).float(), relu2_linear.relu2_linear_reference(x, w).float()
    case.max_abs_err = float((got - ref).abs().max())
    atol, rtol = GEMM_TOL
    _finish(case, rates, bool(((got - ref).abs() <= atol * ref.abs().max() + rtol * ref.abs()).all()))


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
    cases = attention_cases(profile, timer, rates) + gemm_cases(profile, timer, rates)
    result = {
        "device": device_info(device), "dry_run": dry_run, "rates": rates, "seconds": round(time.time() - t0, 1),
        "kernels": [asdict(c) for c in cases],
    }  # fmt: skip
    out_path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
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


# --- side-by-side (issue 19 item 5): ours beside the peers a plugin could run instead, identical inputs ---------
COMPARE_GPU = {"heads": 12, "head_dim": 128, "window_left": 512, "page": 16, "ctx": 2048, "batches": (1, 32, 256),
               "prefill": (4, 2048), "mlp_kn": (1536, 6144), "mlp_ms": (1, 32, 256, 8192), "launches": 20,
               "replays": 5, "rotate_bytes": 96 << 20}  # fmt: skip
COMPARE_DRY = {"heads": 2, "head_dim": 64, "window_left": 32, "page": 16, "ctx": 64, "batches": (1, 32),
               "prefill": (2, 64), "mlp_kn": (64, 256), "mlp_ms": (1, 32), "launches": 2, "replays": 1,
               "rotate_bytes": 1 << 16}  # fmt: skip


def launch_us(fns: list[Callable[[], object]], launches: int, replays: int, cuda: bool) -> tuple[float, str]:
    """(µs per launch, method). CUDA: one graph of `launches` back-to-back calls rotated over `fns` (input copies
    whose total exceeds L2), replayed `replays` times; median replay / launches, so host overhead is out.
    CPU (dry run): plain perf_counter of the same calls; the time means nothing."""
    for fn in fns:  # warm-up: compiles, autotunes, allocator pools
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for i in range(launches):
            fns[i % len(fns)]()
        return (time.perf_counter() - t0) * 1e6 / launches, "plain (CPU)"
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
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return times[len(times) // 2] / launches, "cuda-graph replay"


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


def attention_compare(p: dict, device: torch.device, cuda: bool) -> list[dict]:
    """Decode (batch x 1 query at ctx keys) and prefill (n x T tokens), S (window_left) and L (full) layers."""
    rows, scale, hd, h = [], p["head_dim"] ** -0.5, p["head_dim"], p["heads"]
    peers = ("cudnn", "flash") if cuda else ("math",)
    try:
        import vllm  # noqa: F401

        vllm_note = "installed, not wired into this check"
    except Exception:
        vllm_note = "not installed"
    shapes = [("decode", b, 1) for b in p["batches"]] + [("prefill", p["prefill"][0], p["prefill"][1])]
    for kind, batch, q_len in shapes:
        ctx = p["ctx"]
        for layer, window in (("S", p["window_left"]), ("L", None)):
            case = f"attn {kind} {layer} b={batch} q={q_len} ctx={ctx}"
            print(f"  {case}", flush=True)
            row: dict = {"op": "attention", "kind": kind, "size": batch, "case": case, "ours_us": None,
                         "ours_ok": False, "method": None, "peers": {}, "error": None}  # fmt: skip
            rows.append(row)
            try:
                _attention_row(row, kind, batch, q_len, ctx, window, scale, hd, h, p, device, cuda, peers)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"    FAILED: {row['error']}", flush=True)
            row["peers"]["vllm_triton"] = {"us": None, "ok": False, "note": vllm_note}
    return rows


def _close(got: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    diff = (got.float() - ref.float()).abs()
    atol, rtol = ATTN_TOL
    return bool((diff <= atol * ref.float().abs().max() + rtol * ref.float().abs()).all()), float(diff.max())


def _attention_row(row: dict, kind: str, batch: int, q_len: int, ctx: int, window: int | None, scale: float,
                   hd: int, h: int, p: dict, device: torch.device, cuda: bool, peers: tuple) -> None:  # fmt: skip
    kv_bytes = batch * ctx * h * hd * 2 * 2
    copies = max(1, min(8, -(-p["rotate_bytes"] // kv_bytes)))
    inputs = []
    for c in range(copies):  # vLLM's KV layout, physical blocks shuffled
        inputs.append(paged_inputs(batch, ctx, q_len, h, hd, p["page"], device, seed=2000 + c, dtype=DTYPE,
                                   vllm_layout=True))  # fmt: skip
    # ours, as the vLLM plugin calls it (max_seq_len = max_model_len)
    ours = [lambda a=a: attention.paged_attention_triton(*a, scale, window, max_query_len=q_len, max_seq_len=ctx)
            for a in inputs]  # fmt: skip
    refs = [attention.paged_attention_reference(*a, scale, window) for a in inputs[:1]]
    row["ours_ok"], row["ours_err"] = _close(ours[0](), refs[0])
    row["ours_us"], row["method"] = launch_us(ours, p["launches"], p["replays"], cuda)
    # peers: contiguous gathers of the same in-window keys (not timed), [batch, heads, len, hd]
    first = 0 if window is None or kind == "prefill" else max(0, ctx - 1 - window)
    gathered = []
    for q, kc, vc, bt, _, _ in inputs:
        k, v = _gather(kc, bt, ctx)[:, :, first:], _gather(vc, bt, ctx)[:, :, first:]
        gathered.append((q.view(batch, q_len, h, hd).transpose(1, 2).contiguous(), k.contiguous(), v.contiguous()))
    causal = kind == "prefill"

    def to_tokens(o: torch.Tensor) -> torch.Tensor:
        return o.transpose(1, 2).reshape(batch * q_len, h, hd)

    candidates: dict[str, Callable] = {}
    if kind == "decode" or window is None:  # flash / cuDNN take no sliding-window mask here: prefill S is flex only
        for name in peers:
            sdpa = _sdpa_peer(name)
            candidates[f"sdpa_{name}"] = lambda g, s=sdpa: s(g[0], g[1], g[2], causal, scale)
    flex_window = window if kind == "prefill" else None  # decode gathers only in-window keys already
    for compiled in (True,) if cuda else (False,):
        kv_len = gathered[0][1].shape[2]
        flex = _flex_peer(q_len, kv_len, flex_window, device, compiled)
        candidates["flex_compiled" if compiled else "flex_eager"] = lambda g, f=flex: f(g[0], g[1], g[2], scale)
    for name, fn in candidates.items():
        peer: dict = {"us": None, "ok": False}
        row["peers"][name] = peer
        try:
            peer["ok"], peer["err"] = _close(to_tokens(fn(gathered[0])), refs[0])
            peer["us"], _ = launch_us([lambda g=g, fn=fn: fn(g) for g in gathered], p["launches"], p["replays"], cuda)
        except Exception as e:
            peer["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"    {name}: {peer}", flush=True)
    row["note"] = "peers time attention on a contiguous gather of the in-window keys; the gather is not timed"


def relu2_compare(p: dict, device: torch.device, cuda: bool) -> list[dict]:
    """The MLP as the plugins run it: F.linear c_fc, relu^2, F.linear c_proj (bf16), relu^2 by each path."""
    k, n = p["mlp_kn"]
    rows = []
    paths: dict[str, Callable] = {"ours": relu2.relu2_triton, "eager": lambda x: torch.relu(x).square()}
    if cuda:
        paths["compiled"] = torch.compile(lambda x: torch.relu(x).square())
    for m in p["mlp_ms"]:
        case = f"mlp M={m} K={k} N={n}"
        print(f"  {case}", flush=True)
        row: dict = {"op": "relu2", "kind": "relu2", "size": m, "case": case, "ours_us": None, "ours_ok": False,
                     "method": None, "peers": {}, "error": None}  # fmt: skip
        rows.append(row)
        try:
            w_fc = torch.randn(n, k, device=device, dtype=DTYPE) * k**-0.5
            w_proj = torch.randn(k, n, device=device, dtype=DTYPE) * n**-0.5
            per = m * (k + n) * 2
            xs = [torch.randn(m, k, device=device, dtype=DTYPE) for _ in range(max(1, min(8, -(-p["rotate_bytes"]
                                                                                              // per))))]  # fmt: skip
            ref = torch.nn.functional.linear(relu2.relu2_reference(torch.nn.functional.linear(xs[0], w_fc)), w_proj)
            for name, act in paths.items():
                def mlp(x: torch.Tensor, act: Callable = act, w_fc: torch.Tensor = w_fc,
                        w_proj: torch.Tensor = w_proj) -> torch.Tensor:  # fmt: skip
                    return torch.nn.functional.linear(act(torch.nn.functional.linear(x, w_fc)), w_proj)

                ok = bool(torch.allclose(mlp(xs[0]).float(), ref.float(), atol=GEMM_TOL[0], rtol=GEMM_TOL[1]))
                us, method = launch_us([lambda x=x, f=mlp: f(x) for x in xs], p["launches"], p["replays"], cuda)
                if name == "ours":
                    row["ours_us"], row["ours_ok"], row["method"] = us, ok, method
                else:
                    row["peers"][name] = {"us": us, "ok": ok}
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"    FAILED: {row['error']}", flush=True)
        print(f"    ours {row['ours_us']} us ok={row['ours_ok']}; peers {row['peers']}", flush=True)
    return rows


def run_compare(out_path: Path, dry_run: bool) -> int:
    device = torch.device("cpu" if dry_run else "cuda")
    cuda = device.type == "cuda"
    p = COMPARE_DRY if dry_run else COMPARE_GPU
    torch.manual_seed(0)
    rows = attention_compare(p, device, cuda) + relu2_compare(p, device, cuda)
    info = {"device": device_info(device), "profile": p, "compare": rows,
            "informational": "relu2_linear (no plugin runs it) is in kernels.json only, outside the verdicts"}
    out_path.write_text(json.dumps(info, indent=1, default=_json_default) + "\n")
    bad = [r["case"] for r in rows if r["error"]]
    print(f"compare: {len(rows)} rows, {len(bad)} errors {bad or ''}")
    return 1 if bad else 0


# The verdict (issue 19 item 5): ours ("triton") only where it is within these factors of the best peer that passed
# its cross-check, at every counted row, and every cross-check of ours passed; else the engine's kernels ("engine").
# Counted rows: decode at batch >= 32, every prefill row, relu2 at M >= 32.
VERDICT_LIMITS = {"decode": (32, 1.05), "prefill": (1, 1.5), "relu2": (32, 1.05)}  # kind: (min size, max ratio)
VERDICT_OPS = {"attention": ("decode", "prefill"), "relu2": ("relu2",)}


def verdict(op: str, rows: list[dict]) -> dict[str, str]:
    """{"verdict": "triton" | "engine", "reason": ...} for `op` from side-by-side rows.

    A row: {"kind": "decode" | "prefill" | "relu2", "size": batch or M, "case": name, "ours_us": float | None,
    "ours_ok": bool, "peers": {peer: {"us": float | None, "ok": bool}}}. A peer with no time or a failed
    cross-check does not count; a counted row without a counting peer, or with ours failing, gives "engine".
    """
    kinds = VERDICT_OPS[op]
    counted = [r for r in rows if r["kind"] in kinds and r["size"] >= VERDICT_LIMITS[r["kind"]][0]]
    if not counted:
        return {"verdict": "engine", "reason": "no side-by-side row measured"}
    failed = [r["case"] for r in rows if r["kind"] in kinds and not r["ours_ok"]]
    if failed:
        return {"verdict": "engine", "reason": f"our cross-check failed: {', '.join(failed)}"}
    worst: tuple[float, str, str] = (0.0, "", "")
    for r in counted:
        peers = {n: p["us"] for n, p in r["peers"].items() if p["ok"] and p["us"] is not None and p["us"] > 0}
        if r["ours_us"] is None or not r["ours_us"] > 0:
            return {"verdict": "engine", "reason": f"{r['case']}: ours not timed"}
        if not peers:
            return {"verdict": "engine", "reason": f"{r['case']}: no peer passed its cross-check"}
        best = min(peers, key=lambda n: peers[n])
        ratio = r["ours_us"] / peers[best]
        if ratio > VERDICT_LIMITS[r["kind"]][1]:
            return {"verdict": "engine", "reason": f"{r['case']}: ours {ratio:.2f}x {best} "
                    f"(limit {VERDICT_LIMITS[r['kind']][1]}x)"}  # fmt: skip
        worst = max(worst, (ratio, r["case"], best))
    return {"verdict": "triton", "reason": f"worst counted row {worst[1]}: ours {worst[0]:.2f}x {worst[2]}"}


def verdicts(env: dict, rows: list[dict]) -> dict[str, object]:
    """The `verdicts` object of gpu_check.json: the GPU's name and capability, one verdict per op."""
    return {"gpu": env.get("name", "?"), "capability": env.get("capability", "?"),
            **{op: verdict(op, rows) for op in VERDICT_OPS}}  # fmt: skip


def report(out_dir: Path) -> int:
    """Merge the step files into OUT/gpu_check.json and print the summary table; non-zero if anything failed."""
    parts: dict[str, object] = {}
    for name in ("env", "kernel_tests", "kernel_tests_builtin", "kernels", "compare", "decode"):
        path = out_dir / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else None
    steps = {}
    if (out_dir / "steps.tsv").exists():  # written by scripts/gpu_check.sh: name, exit code, seconds
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
    for key in ("kernel_tests", "kernel_tests_builtin"):
        tests = parts[key]
        if tests:
            print(f"  kernel tests ({tests['runner']}): {tests['passed']} passed, {tests['failed']} failed "
                  f"{tests['failures'] or ''}")  # fmt: skip
    kern = parts["kernels"]
    if kern:
        r = kern["rates"]
        print(f"\nkernels (bf16; floor = max(bytes / copy {r['copy_gbps']:.0f} GB/s, FLOPs / GEMM "
              f"{r['gemm_tflops']:.1f} TFLOP/s))")  # fmt: skip
        print(f"{'case':<40} {'ms':>8} {'torch ms':>9} {'GB/s':>7} {'%copy':>6} {'TFLOP/s':>8} {'%floor':>7} "
              f"{'max err':>8} ok")  # fmt: skip
        for c in kern["kernels"]:
            print(f"{c['name']:<40} {_fmt(c['ms'], '8.3f')} {_fmt(c['torch_ms'], '9.3f')} {_fmt(c['gbps'], '7.0f')} "
                  f"{_fmt(c['pct_copy'], '6.0f')} {_fmt(c['tflops'], '8.1f')} {_fmt(c['pct_floor'], '7.0f')} "
                  f"{_fmt(c['max_abs_err'], '8.1e')} {'yes' if c['ok'] else 'NO: ' + str(c['error'])}")  # fmt: skip
    dec = parts["decode"]
    if dec:
        print(f"\nwhole-model decode step ({dec['model']}, bf16, paged KV, ctx {dec['ctx']}): parity "
              f"fp32 {'ok' if dec['parity_fp32']['ok'] else 'FAILED'}, bf16 "
              f"{'ok' if dec['parity_bf16']['ok'] else 'FAILED'}")  # fmt: skip
        print(f"{'windows':<9} {'batch':>5} {'graph':>6} {'ms/step':>8} {'tok/s':>9} {'eager tok/s':>11} "
              f"{'%roofline':>9} {'%copy-roof':>10} {'KV GB':>6} note")  # fmt: skip
        for row in dec["rows"]:
            print(f"{row['windows']:<9} {row['batch']:>5} {'yes' if row['graph'] else 'no':>6} "
                  f"{_fmt(row['ms'], '8.3f')} {_fmt(row['tok_s'], '9.0f')} {_fmt(row['eager_tok_s'], '11.0f')} "
                  f"{_fmt(row['pct_roofline'], '9.0f')} {_fmt(row['pct_copy_roofline'], '10.0f')} "
                  f"{_fmt(row['kv_gb'], '6.1f')} {row['note'] or ''}")  # fmt: skip
    if compare:
        print("\nside by side (µs per launch; a peer's time only where its cross-check passed)")
        for row in compare:
            peers = "  ".join(f"{n} {_fmt(v.get('us'), '6.1f')}{'' if v.get('ok') else ' (x)'}"
                              for n, v in row["peers"].items())  # fmt: skip
            print(f"  {row['case']:<40} ours {_fmt(row['ours_us'], '6.1f')}{'' if row['ours_ok'] else ' (x)'}  "
                  f"{peers}  {row['error'] or ''}")  # fmt: skip
    print(f"\nverdicts ({verdict_table['gpu']}, capability {verdict_table['capability']}; \"triton\" means: add "
          "this GPU name to MEASURED_FASTER[op] in kernels/cognica_kernels/dispatch.py; \"engine\": leave it out)")  # fmt: skip
    for op in VERDICT_OPS:
        v = verdict_table[op]
        print(f"  {op:<10} {v['verdict']:<7} {v['reason']}")
    print(f"\nfull results: {out_dir / 'gpu_check.json'}")
    print(f"=== GPU check: {'PASSED' if summary['ok'] else 'FAILED'}")
    return 0 if summary["ok"] else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="time the kernels, write JSON")
    k.add_argument("--out", type=Path, required=True)
    k.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    c = sub.add_parser("compare", help="ours beside the peers on identical inputs, write JSON")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    r = sub.add_parser("report", help="merge the step files of OUT and print the table")
    r.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    if args.cmd == "compare":
        return run_compare(args.out, args.dry_run)
    return run_kernels(args.out, args.dry_run) if args.cmd == "kernels" else report(args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
