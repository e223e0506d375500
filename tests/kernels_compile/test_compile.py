"""Every Triton kernel lowers to PTX and a cubin for sm_80 (A100) and sm_90 (H100), with no GPU present, and the
variants production launches compile without spills at >= 25 % occupancy with a double-buffered decode loop (the
FA-class prefill tiles, one program per SM by design: without spills, in the SM's shared memory, double-buffered).

Two checks. `test_every_kernel_lowers_...` compiles hand-written configurations (GQA, head_dim 64, fp32) for
legality.
`test_production_variants_...` runs the real launchers at the model's production shapes and strides (vLLM's
KV view, SGLang's token pool) with `JITFunction.run` replaced by a recorder, applies Triton's own launch-time
specialisation to each recorded call and compiles what a launch would compile;
`python tests/kernels_compile/test_compile.py --table` prints its table (docs/performance.md, "Compiled variants").

scripts/test.sh runs this file twice: on the engines' Triton (3.9 in .venv/vllm) and on Triton 3.6.0, the GPU
machines' version, installed by scripts/setup.sh into .venv/triton36 and put ahead of the venv's with
`PYTHONPATH=.venv/triton36` and `COGNICA_TRITON_VERSION=3.6.0` (test_compiles_with_the_triton_the_step_names
fails if the shadowing did not take). Register counts differ between the two (docs/performance.md has both).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's bundled LLVM and ptxas. It
cannot run in a process where `TRITON_INTERPRET=1` was set before the kernels were defined
(tests/kernels/test_kernels.py sets it): `triton.jit` then returns interpreter objects, not `JITFunction`s. So the
compile runs in subprocesses
(this file run as a script, one per target) with the variable removed and a cold Triton cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TARGETS = (80, 90)


def _variants() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(label, kernel, pointer dtypes, constexprs) for each kernel configuration the launchers can pick."""
    from cognica_kernels import attention, relu2

    out: list[tuple[str, object, dict[str, str], dict[str, object]]] = []
    for dtype in ("bf16", "fp32"):
        out.append((f"relu2/{dtype}", relu2._relu2_kernel, {"x_ptr": dtype, "y_ptr": dtype}, {"BLOCK_SIZE": 1024}))
    # (label, dtype, head_dim, group, block_q, splits, page_size): decode and prefill tiles, MHA (the model) and
    # GQA, both head dims, split-K, SGLang's page size 1.
    attn_cases = [
        ("decode-mha-hd128-split4", "bf16", 128, 1, 1, 4, 16),
        ("prefill-mha-hd128", "bf16", 128, 1, 64, 1, 16),
        ("prefill-gqa4-hd64-page1", "bf16", 64, 4, 16, 1, 1),
        ("decode-gqa8-hd128", "bf16", 128, 8, 1, 1, 32),
        ("decode-mha-hd128-fp32", "fp32", 128, 1, 1, 1, 16),
    ]
    for label, dtype, head_dim, group, block_q, splits, page_size in attn_cases:
        group_p2 = 1 << (group - 1).bit_length()
        ptrs = {"q_ptr": dtype, "key_cache_ptr": dtype, "value_cache_ptr": dtype, "block_table_ptr": "i32",
                "seq_lens_ptr": "i32", "query_start_loc_ptr": "i32", "out_ptr": dtype, "part_acc_ptr": "fp32",
                "part_ml_ptr": "fp32"}  # fmt: skip
        consts = {"GROUP": group, "GROUP_P2": group_p2, "HEAD_DIM": head_dim, "PAGE_SIZE": page_size,
                  "BLOCK_Q": block_q, "BLOCK_M": max(16, block_q * group_p2), "BLOCK_N": 32, "NUM_SPLITS": splits,
                  "DOT_FP32": False, "NUM_STAGES": 5, "ROWS": 1 if block_q == 1 else 0,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
        out.append((f"paged_attention/{label}", attention._paged_attention_kernel, ptrs, consts))
    for head_dim, per_sequence in ((64, False), (128, True)):
        out.append((
            f"merge_splits/hd{head_dim}" + ("/per-sequence" if per_sequence else ""),
            attention._merge_splits_kernel,
            {"part_acc_ptr": "fp32", "part_ml_ptr": "fp32", "out_ptr": "bf16", "query_start_loc_ptr": "i32"},
            {"HEAD_DIM": head_dim, "NUM_SPLITS": 4, "SPLITS_P2": 4, "PER_SEQUENCE": per_sequence},
        ))  # fmt: skip
    return out


def _signature(kernel, ptrs: dict[str, str], consts: dict[str, object]) -> dict[str, str]:
    """Pointers as given, constexprs as such, the float scalars fp32 and every other argument i32."""
    floats = {"scale"}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    return sig


def _compile_all(cc: int) -> dict[str, dict[str, object]]:
    """Compile every variant for sm_`cc`; report the stages produced and the PTX target line."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report: dict[str, dict[str, object]] = {}
    for label, kernel, ptrs, consts in _variants():
        sig = _signature(kernel, ptrs, consts)
        # pointers 16-byte aligned, as torch allocations are
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in ptrs}
        key = f"{label}@sm_{cc}"
        try:
            compiled = triton.compile(ASTSource(kernel, sig, consts, attrs), target=GPUTarget("cuda", cc, 32))
        except Exception as e:  # reported to the parent test, which fails on it
            report[key] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            continue
        ptx = compiled.asm.get("ptx", "")
        report[key] = {
            "stages": sorted(compiled.asm),
            "ptx_target": next((ln.split()[1] for ln in ptx.splitlines() if ln.startswith(".target")), None),
            "cubin_bytes": len(compiled.asm.get("cubin", b"")),
        }
    return report


def test_compiles_with_the_triton_the_step_names():
    """COGNICA_TRITON_VERSION (the Triton 3.6 step sets it) is the Triton imported here and in the compile
    subprocesses, which inherit this environment; without it, the venv's installed Triton."""
    import importlib.metadata

    import triton

    expected = os.environ.get("COGNICA_TRITON_VERSION") or importlib.metadata.version("triton")
    assert triton.__version__ == expected, f"imported Triton {triton.__version__} from {triton.__file__}, " \
                                           f"expected {expected}"


def test_every_kernel_lowers_to_cubin_for_sm80_and_sm90(tmp_path):
    report = _run_targets("legality", str(tmp_path / "triton-cache"))
    expected = len(_variants()) * len(TARGETS)
    assert len(report) == expected, f"expected {expected} compiled variants, got {len(report)}"
    errors = {k: v["error"] for k, v in report.items() if "error" in v}
    assert not errors, "kernels that did not lower:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items())
    for key, entry in report.items():
        cc = key.rsplit("@sm_", 1)[1]
        assert {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(entry["stages"]), f"{key}: stages {entry['stages']}"
        # sm_90 kernels target sm_90a (wgmma); the prefix is what matters
        assert str(entry["ptx_target"]).startswith(f"sm_{cc}"), f"{key}: PTX targets {entry['ptx_target']}"
        assert entry["cubin_bytes"] > 0, f"{key}: ptxas produced an empty cubin"


# ---- production variants: what the real launchers would compile, captured without launching ----

# Per-SM limits (CUDA occupancy calculator): 64K registers allocated per warp in units of 256, 64 warps,
# 32 blocks, shared memory 164 KiB (A100) / 228 KiB (H100) with 1 KiB reserved per block. SM counts for split-K.
_SM = {80: {"smem": 167936, "sms": 108}, 90: {"smem": 233472, "sms": 132}}
_CAPTURED = ("attention._paged_attention_kernel", "attention._merge_splits_kernel", "relu2._relu2_kernel")
MIN_OCCUPANCY = 0.25  # every variant but the FA-class prefill tiles (cognica_kernels.attention.FA_CLASS_ROWS rows)


def occupancy(cc: int, regs: int, smem: int, num_warps: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / 64) for a kernel of `regs` registers per thread, `smem` bytes of
    shared memory and `num_warps` warps per block on sm_`cc`."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (65536 // regs_per_warp) // num_warps
    by_smem = _SM[cc]["smem"] // (smem + 1024)
    blocks = min(32, 64 // num_warps, by_regs, by_smem)
    return blocks, blocks * num_warps / 64


def _production_launches():
    """(label, thunk) per production launch: the plugins' calls of the launchers at the model's shapes (head_dim
    128, 12 query = 12 KV heads, bf16, S layers window_left 512, L layers full, max_model_len 2048)."""
    import torch

    from cognica_kernels import attention, relu2, token_pool

    heads, hd, dt, max_len = 12, 128, torch.bfloat16, 2048

    def vllm_cache(block_size: int, num_blocks: int = 64):
        # vLLM's flash-attn KV tensor for one layer, [blocks, kv_heads, block, 2 * hd], as cognica_vllm.attention
        # views it: kv_cache.transpose(1, 2).split(hd, dim=-1), each [blocks, block, kv_heads, hd]
        kv = torch.zeros(num_blocks, heads, block_size, 2 * hd, dtype=dt)
        return kv.transpose(1, 2).split(hd, dim=-1)

    def vllm(batch: int, q_len: int, window_left, block_size: int = 16, mixed: bool = False):
        def go():  # mixed: batch - 1 one-query rows and one of q_len
            key_cache, value_cache = vllm_cache(block_size)
            tokens = batch - 1 + q_len if mixed else batch * q_len
            q = torch.zeros(tokens, heads * hd, dtype=dt).view(-1, heads, hd)  # out.flatten(-2) later
            blocks = -(-max_len // block_size)
            table = torch.zeros(batch, blocks, dtype=torch.int32)
            seq_lens = torch.full((batch,), max_len, dtype=torch.int32)
            qsl = torch.arange(0, batch + 1, dtype=torch.int32) * (1 if mixed else q_len)
            if mixed:
                qsl[-1] = tokens
            attention.paged_attention(q, key_cache, value_cache, table, seq_lens, qsl, hd**-0.5, window_left,
                                      max_query_len=q_len, max_seq_len=max_len)
        return go

    def sglang(batch: int, q_len: int, window_left, slots: int = 4096):
        def go():  # SGLang's token pool: per layer k/v buffers [slots, kv_heads, hd]; req_to_token [reqs, ctx]
            k_buf = torch.zeros(slots, heads, hd, dtype=dt)
            v_buf = torch.zeros(slots, heads, hd, dtype=dt)
            q = torch.zeros(batch * q_len, heads * hd, dtype=dt).view(-1, heads, hd)
            req_to_token = torch.zeros(batch + 1, max_len, dtype=torch.int32)
            token_pool.token_pool_attention(q, k_buf, v_buf, req_to_token, torch.arange(batch),
                                           torch.full((batch,), max_len), torch.full((batch,), q_len), hd**-0.5,
                                           window_left, max_query_len=q_len)
        return go

    def mlp(m: int):
        return lambda: relu2.relu2_triton(torch.zeros(m, 6144, dtype=dt))  # the relu^2 between c_fc and c_proj

    out = []
    q_lens = (2, 4, 8, 16, 32, 64, 512)  # prefill / chunks / mixed steps: BLOCK_Q follows max_query_len to the tile
    for window, layer in ((512, "S"), (None, "L")):
        for batch in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):  # vLLM's CUDA-graph capture sizes: split-K varies
            out.append((f"vllm decode {layer} b{batch}", vllm(batch, 1, window)))
        for q_len in q_lens:
            out.append((f"vllm prefill {layer} q{q_len}", vllm(2, q_len, window)))
        for batch in (2, 64, 256):  # mixed steps: one 512-token chunk and one-query rows (the decode tile's splits)
            out.append((f"vllm mixed {layer} b{batch}", vllm(batch, 512, window, mixed=True)))
        for q_len in (1, *q_lens):  # SGLang runs our kernel for EXTEND batches (prefill), decode stays its own
            out.append((f"sglang extend {layer} q{q_len}", sglang(2, q_len, window)))
    out.append(("relu2 M8192", mlp(8192)))
    return out


def _capture_launches(cc: int) -> list[tuple[str, object, tuple, dict]]:
    """Run every production launch with the kernels' `run` replaced by a recorder: nothing is launched, each call
    gives (label, kernel, args, kwargs) exactly as `JITFunction.run` would receive them."""
    from cognica_kernels import attention, relu2

    modules = {"attention": attention, "relu2": relu2}
    kernels = [getattr(modules[m], name) for m, name in (c.split(".") for c in _CAPTURED)]
    calls: list[tuple[str, object, tuple, dict]] = []
    current = [""]  # the launch being run
    for k in kernels:
        k.run = (lambda kern: lambda *a, grid, warmup, **kw: calls.append((current[0], kern, a, kw)))(k)
    real = attention.num_sms, attention.device_arch, attention.uses_triton
    attention.num_sms = lambda device_index: _SM[cc]["sms"]  # the launcher's split-K by the target's SM count
    attention.device_arch = lambda device_index: cc  # and its tiles by the target's architecture
    attention.uses_triton = lambda t: True  # the dispatchers the plugins call take the Triton path
    try:
        for current[0], launch in _production_launches():
            launch()
    finally:
        attention.num_sms, attention.device_arch, attention.uses_triton = real
        for k in kernels:
            del k.run
    return calls


def _specialise(kernel, args: tuple, kwargs: dict, backend):
    """What `JITFunction.run` computes before `_do_compile`: the launch-time specialisation (integers divisible by
    16 and 16-byte-aligned pointers get `tt.divisibility`, integers equal to 1 become constants), the constexprs
    and the options (num_warps, num_stages)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # newer Triton (3.9) only; 3.6 has no such knob
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return kernel._pack_args(backend, kwargs, bound_args, specialization, options)


def _ptxas_usage(log: str) -> dict[str, int]:
    """Registers, spill bytes and stack from `ptxas -v`'s log (Triton runs ptxas with -v)."""
    import re

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else -1

    return {"regs": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame")}


def pipelining(ttgir: str) -> dict[str, int]:
    """What the TTGIR shows of a key loop's overlap of copies and math:

    - `async_copies`: asynchronous global->shared copies (cp.async) issued anywhere in the kernel;
    - `multi_buffers`: K/V-sized shared buffers with two or more slots (`memdesc<2x...x...>`): the next tile can be
      copied while the current one is read;
    - `loop_wait_pending`: the copy groups the first `async_wait` in the first `scf.for` leaves in flight before the
      loop's first dot (0: every copy is waited for at the top of the loop, no overlap; -1: no such wait).
    """
    import re

    buffers = re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x(?:bf16|f16|f32)", ttgir)
    pending = -1
    loop = ttgir.find("scf.for")
    if loop >= 0:
        body = ttgir[loop:]
        dots = [i for i in (body.find("tt.dot "), body.find("ttng.warp_group_dot ")) if i >= 0]
        wait = re.search(r"ttg\.async_wait[^{]*\{num = (\d+) : i32\}", body)
        if wait and dots and wait.start() < min(dots):
            pending = int(wait.group(1))
    return {"async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "multi_buffers": sum(1 for n in buffers if int(n) >= 2), "loop_wait_pending": pending}


def _compile_production(cc: int) -> dict[str, dict[str, object]]:
    """Compile every distinct production variant for sm_`cc`; registers, spills, smem, occupancy, pipelining."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's log
    variants: dict[str, dict[str, object]] = {}
    for label, kernel, args, kwargs in _capture_launches(cc):
        options, signature, constexprs, attrs = _specialise(kernel, args, kwargs, backend)
        names = list(signature)
        consts = {names[path[0]]: v for path, v in constexprs.items() if len(path) == 1}
        divisible = sorted(names[path[0]] for path, a in attrs.items() if ["tt.divisibility", 16] in a)
        key = repr((kernel.__name__, sorted(signature.items()), sorted(consts.items(), key=str), divisible,
                    options.num_warps, options.num_stages))
        if key in variants:
            variants[key]["launches"].append(label)
            continue
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            try:
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                          options=options.__dict__)
            except Exception as e:  # reported, and the parent test fails on it
                variants[key] = {"kernel": kernel.__name__, "launches": [label], "error": f"{type(e).__name__}: {e}"}
                continue
        usage = _ptxas_usage(log.getvalue())
        smem = compiled.metadata.shared
        blocks, occ = occupancy(cc, usage["regs"], smem, options.num_warps)
        shown = {k: consts[k] for k in ("BLOCK_Q", "BLOCK_M", "BLOCK_N", "NUM_SPLITS", "PAGE_SIZE", "BLOCK_SIZE",
                                        "ROWS", "PER_SEQUENCE") if k in consts}
        variants[key] = {"kernel": kernel.__name__.lstrip("_"), "launches": [label], "constexprs": shown,
                         "divisible_args": divisible, "num_warps": options.num_warps,
                         "num_stages": options.num_stages, "smem": smem, "blocks_per_sm": blocks, "occupancy": occ,
                         **usage, **pipelining(compiled.asm["ttgir"]),
                         "ptx_target": next((ln.split()[1] for ln in compiled.asm["ptx"].splitlines()
                                             if ln.startswith(".target")), None)}  # fmt: skip
    return {f"{v['kernel']}#{i}@sm_{cc}": v for i, v in enumerate(variants.values())}


def format_table(report: dict[str, dict[str, object]], beside: dict[str, dict[str, object]] | None = None,
                 beside_name: str = "") -> str:
    """The markdown table docs/performance.md keeps ("Compiled variants"); `beside`, another Triton's report of the
    same launches, adds its registers / spills / occupancy in one column headed `beside_name`."""
    other = {(k.rsplit("@", 1)[1], v["kernel"], v["launches"][0]): v for k, v in (beside or {}).items()}
    rows = ["| sm | kernel | tile | warps / stages | regs | spills (st/ld B) | smem KiB | blocks/SM | occupancy "
            "| cp.async / 2-slot buffers / in flight at the dots | production launches |"
            + (f" {beside_name}: regs, spills, occupancy |" if beside else ""),
            "|---|---|---|---|---:|---|---:|---:|---:|---|---|" + ("---|" if beside else "")]
    def order(kv):  # by target, then kernel, then the order of the first launch that compiles it
        kernel, rest = kv[0].split("#")
        return rest.split("@")[1], kernel, int(rest.split("@")[0])

    for key, v in sorted(report.items(), key=order):
        sm = key.rsplit("@", 1)[1]
        if "error" in v:
            rows.append(f"| {sm} | {v['kernel']} | ERROR: {str(v['error'])[:200]} | | | | | | | | "
                        f"{', '.join(v['launches'])} |")
            continue
        names = {"ROWS": {0: "all", 1: "one-query", 2: "multi-query"}}  # which sequences a launch serves
        tile = " ".join(f"{k.replace('BLOCK_', '').replace('NUM_', '')}={names.get(k, {}).get(c, c)}"
                        for k, c in v["constexprs"].items() if (k, c) not in (("ROWS", 0), ("PER_SEQUENCE", False)))
        rows.append(f"| {sm} | {v['kernel']} | {tile} | {v['num_warps']} / {v['num_stages']} | {v['regs']} "
                    f"| {v['spill_stores']}/{v['spill_loads']} | {v['smem'] / 1024:.1f} | {v['blocks_per_sm']} "
                    f"| {v['occupancy']:.0%} | {v['async_copies']} / {v['multi_buffers']} / {v['loop_wait_pending']} "
                    f"| {', '.join(v['launches'])} |")
        if beside:
            o = other.get((sm, v["kernel"], v["launches"][0]))
            rows[-1] += (" not compiled |" if o is None or "error" in o else
                         f" {o['regs']}, {o['spill_stores']}/{o['spill_loads']}, {o['occupancy']:.0%} |")
    return "\n".join(rows)


def _run_targets(mode: str, cache_dir: str, pythonpath: str | None = None) -> dict[str, dict[str, object]]:
    """This file as a script, one process per target in parallel, with the interpreter off and a cold cache
    (`pythonpath`: the PYTHONPATH of the subprocesses instead of this one's, "" for none)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    env["TRITON_CACHE_DIR"] = cache_dir  # a cold cache: every kernel really compiles
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {
        cc: subprocess.Popen([sys.executable, __file__, mode, str(cc)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        for cc in TARGETS
    }
    report: dict[str, dict[str, object]] = {}
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"sm_{cc} {mode} compile subprocess failed:\n{stderr[-4000:]}"
        report.update(json.loads(stdout.strip().splitlines()[-1]))
    return report


def test_production_variants_compile_without_spills_at_25_percent_occupancy(tmp_path):
    from cognica_kernels.attention import FA_CLASS_ROWS

    report = _run_targets("production", str(tmp_path / "triton-cache"))
    print("\n" + format_table(report))  # pytest -s shows it; docs/performance.md keeps it
    errors = {k: v["error"] for k, v in report.items() if "error" in v}
    assert not errors, "production variants that did not compile:\n" + "\n".join(f"{k}: {v}" for k, v in errors.items())
    for key, v in report.items():
        cc = key.rsplit("@sm_", 1)[1]
        assert str(v["ptx_target"]).startswith(f"sm_{cc}"), f"{key}: PTX targets {v['ptx_target']}"
        assert v["regs"] > 0 and v["spill_stores"] == 0 and v["spill_loads"] == 0 and v["stack"] == 0, (
            f"{key} ({', '.join(v['launches'])}): {v['regs']} registers, {v['spill_stores']} B spill stores, "
            f"{v['spill_loads']} B spill loads, {v['stack']} B stack")
        if v["kernel"] == "paged_attention_kernel" and v["constexprs"]["BLOCK_M"] == 16:  # decode tiles
            # the key loop is software-pipelined: K and V each in a two-slot shared buffer, and the copies of the
            # next tile still in flight (async_wait num > 0) when the current tile's dots start
            assert v["multi_buffers"] >= 2 and v["loop_wait_pending"] > 0, (
                f"{key} ({', '.join(v['launches'])}): the decode loop is not double-buffered: "
                f"{v['multi_buffers']} two-slot K/V buffers, {v['loop_wait_pending']} copy groups in flight at the "
                "first dot")
        if v["kernel"] == "paged_attention_kernel" and v["constexprs"]["BLOCK_M"] >= FA_CLASS_ROWS:
            # FA-class prefill tiles run one program per SM by design: gated on spills (above), on their shared
            # memory fitting the SM, and on the two-deep pipelined key loop that hides the copies' latency
            assert v["blocks_per_sm"] >= 1 and v["smem"] + 1024 <= _SM[int(cc)]["smem"], (
                f"{key} ({', '.join(v['launches'])}): {v['smem']} B smem, {v['blocks_per_sm']} blocks per SM")
            assert v["multi_buffers"] >= 2 and v["loop_wait_pending"] > 0, (
                f"{key}: the FA-class loop is not double-buffered ({v['multi_buffers']} two-slot buffers, "
                f"{v['loop_wait_pending']} copy groups in flight)")
            continue
        assert v["occupancy"] >= MIN_OCCUPANCY, (
            f"{key} ({', '.join(v['launches'])}): occupancy {v['occupancy']:.0%} < {MIN_OCCUPANCY:.0%} "
            f"({v['regs']} registers, {v['smem']} B smem, {v['num_warps']} warps)")


if __name__ == "__main__":
    if sys.argv[1] == "--table":  # python tests/kernels_compile/test_compile.py --table: the docs' table
        import importlib.metadata
        import tempfile

        triton36 = str(Path(__file__).resolve().parents[2] / ".venv" / "triton36")  # scripts/setup.sh makes it
        with tempfile.TemporaryDirectory() as d36, tempfile.TemporaryDirectory() as d_venv:
            venv = f"Triton {importlib.metadata.version('triton')}"
            print(format_table(_run_targets("production", d36, triton36), _run_targets("production", d_venv, ""), venv))
    elif sys.argv[1] == "production":
        print(json.dumps(_compile_production(int(sys.argv[2]))))
    else:  # legality CC
        print(json.dumps(_compile_all(int(sys.argv[-1]))))
