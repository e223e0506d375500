"""Every Triton kernel lowers to PTX and a cubin for sm_80 (A100) and sm_90 (H100), with no GPU present.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` runs Triton's bundled LLVM and ptxas. It
cannot run in a process where `TRITON_INTERPRET=1` was set before the kernels were defined (test_kernels.py sets
it): `triton.jit` then returns interpreter objects, not `JITFunction`s. So the compile runs in subprocesses
(this file run as a script, one per target) with the variable removed and a cold Triton cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

TARGETS = (80, 90)


def _variants() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    """(label, kernel, pointer dtypes, constexprs) for each kernel configuration the launchers can pick."""
    from cognica_kernels import attention, relu2

    out: list[tuple[str, object, dict[str, str], dict[str, object]]] = []
    for dtype in ("bf16", "fp32"):
        out.append((f"relu2/{dtype}", relu2._relu2_kernel, {"x_ptr": dtype, "y_ptr": dtype}, {"BLOCK_SIZE": 1024}))
    for m in (1, 64, 4096):
        block_m, block_n, block_k, _, _ = relu2._gemm_settings(m)
        # fp32 (parity runs only) at the decode tile: ieee fp32 dots on 128x128 tiles take ~30 s to compile
        for dtype in ("bf16", "fp32") if m == 1 else ("bf16",):
            out.append((
                f"relu2_linear/{dtype}/BLOCK_M{block_m}",
                relu2._relu2_linear_kernel,
                {"x_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype},
                {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "DOT_FP32": False,
                 "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"},
            ))  # fmt: skip
    # (label, dtype, head_dim, group, block_q, splits, softcap, page_size): decode and prefill tiles, MHA
    # (the model) and GQA, both head dims, split-K, softcap, SGLang's page size 1.
    attn_cases = [
        ("decode-mha-hd128-split4", "bf16", 128, 1, 1, 4, False, 16),
        ("prefill-mha-hd128-softcap", "bf16", 128, 1, 64, 1, True, 16),
        ("prefill-gqa4-hd64-page1", "bf16", 64, 4, 16, 1, False, 1),
        ("decode-gqa8-hd128", "bf16", 128, 8, 1, 1, False, 32),
        ("decode-mha-hd128-fp32", "fp32", 128, 1, 1, 1, False, 16),
    ]
    for label, dtype, head_dim, group, block_q, splits, softcap, page_size in attn_cases:
        group_p2 = 1 << (group - 1).bit_length()
        ptrs = {"q_ptr": dtype, "key_cache_ptr": dtype, "value_cache_ptr": dtype, "block_table_ptr": "i32",
                "seq_lens_ptr": "i32", "query_start_loc_ptr": "i32", "out_ptr": dtype, "part_acc_ptr": "fp32",
                "part_ml_ptr": "fp32"}  # fmt: skip
        consts = {"GROUP": group, "GROUP_P2": group_p2, "HEAD_DIM": head_dim, "PAGE_SIZE": page_size,
                  "BLOCK_Q": block_q, "BLOCK_M": max(16, block_q * group_p2), "BLOCK_N": 64, "NUM_SPLITS": splits,
                  "USE_SOFTCAP": softcap, "DOT_FP32": False,
                  "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}  # fmt: skip
        out.append((f"paged_attention/{label}", attention._paged_attention_kernel, ptrs, consts))
    for head_dim in (64, 128):
        out.append((
            f"merge_splits/hd{head_dim}",
            attention._merge_splits_kernel,
            {"part_acc_ptr": "fp32", "part_ml_ptr": "fp32", "out_ptr": "bf16"},
            {"HEAD_DIM": head_dim, "NUM_SPLITS": 4, "SPLITS_P2": 4},
        ))  # fmt: skip
    return out


def _signature(kernel, ptrs: dict[str, str], consts: dict[str, object]) -> dict[str, str]:
    """Pointers as given, constexprs as such, the float scalars fp32 and every other argument i32."""
    floats = {"scale", "softcap"}
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


def test_every_kernel_lowers_to_cubin_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a cold cache: every kernel really compiles
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    procs = {  # one process per target, in parallel
        cc: subprocess.Popen(
            [sys.executable, __file__, str(cc)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cc in TARGETS
    }
    report: dict[str, dict[str, object]] = {}
    for cc, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"sm_{cc} compile subprocess failed:\n{stderr[-4000:]}"
        report.update(json.loads(stdout.strip().splitlines()[-1]))
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


if __name__ == "__main__":
    print(json.dumps(_compile_all(int(sys.argv[1]))))
