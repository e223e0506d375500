"""The decode roofline model of docs/performance.md, vLLM's sliding-window admission rule, and quick kernel timings.

    python benchmarks/gpu/roofline.py           # CUDA: times each kernel against torch (and vLLM's flash-attn if
                                                # importable); no CUDA: prints the bandwidth roofline table
    python benchmarks/gpu/roofline.py --model   # the roofline table even on a GPU machine

Named `roofline`, not `kernels`: PyPI's `kernels` package (which transformers imports) must stay importable beside
it. Nothing here has been run on a GPU yet: no measured numbers exist for these kernels.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import Timer, paged_inputs  # noqa: E402

from cognica.config import VE_GATE_CHANNELS, CognicaConfig  # noqa: E402

# ------------------------------------------------------------------------------------------- roofline model
# The shape is the core's config (`CognicaConfig()` is Cognica-BP-v1.0-1.3B-base, the factory's "full" preset);
# what a decode step moves and computes is this benchmark's own model of it.

RELEASE = CognicaConfig()
DTYPE_BYTES = 2  # bf16 weights and KV cache


def matmul_weight_params(cfg: CognicaConfig) -> int:
    """Weights every decode step streams in full: c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj, ve_gate, lm_head."""
    d = cfg.n_embd
    per_layer = 2 * d * d + 2 * d * cfg.kv_dim + 2 * d * cfg.mlp_hidden
    ve_gates = len(cfg.ve_layers) * cfg.n_kv_head * VE_GATE_CHANNELS  # ve_gate: [n_kv_head, 12]
    return cfg.n_layer * per_layer + ve_gates + cfg.vocab_size * d


def gathered_bytes_per_token(cfg: CognicaConfig) -> int:
    """wte and value-embedding tables are gathered: one row each per token, not the whole table."""
    return (cfg.n_embd + len(cfg.ve_layers) * cfg.kv_dim) * DTYPE_BYTES


def kv_bytes_per_key(cfg: CognicaConfig) -> int:
    """K and V of one key in one layer."""
    return 2 * cfg.kv_dim * DTYPE_BYTES


def keys_read(cfg: CognicaConfig, ctx: int, sssl: bool) -> int:
    """Keys read over all layers by one decode query with `ctx` keys in its sequence (S layers: the query and the
    `short_window` keys before it)."""
    return sum(min(ctx, keys) if sssl else ctx for keys in cfg.window_keys)


def cdiv(a: int, b: int) -> int:
    """Ceiling division."""
    return -(-a // b)


def sliding_admission_blocks(window_keys: int, in_flight: int, block: int) -> int:
    """Blocks vLLM 0.32 reserves per request for a sliding layer: cdiv(window_keys - 1 + in-flight tokens, block) + 1
    (`SlidingWindowSpec.max_admission_blocks_per_request` in vllm/v1/kv_cache_interface.py, its `sliding_window`
    being our `window_keys`: the query and the `window_left` keys before it). Blocks that leave the window are
    reused, so this bounds what a sequence holds in that layer however long it grows."""
    return cdiv(window_keys - 1 + in_flight, block) + 1


def flops_per_token(cfg: CognicaConfig, ctx: int, sssl: bool) -> int:
    """2 per weight multiply-add plus QK^T and PV (4 * n_embd per key per layer)."""
    return 2 * matmul_weight_params(cfg) + 4 * cfg.n_embd * keys_read(cfg, ctx, sssl)


# peak HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s, from the vendors' data sheets
GPUS = {"H100 SXM": (3.35e12, 989e12), "A100 80GB SXM": (2.039e12, 312e12)}


def decode_step_bytes(cfg: CognicaConfig, batch: int, ctx: int, sssl: bool) -> int:
    weights = matmul_weight_params(cfg) * DTYPE_BYTES
    per_seq = keys_read(cfg, ctx, sssl) * kv_bytes_per_key(cfg) + gathered_bytes_per_token(cfg)
    return weights + batch * per_seq


def roofline_tokens_per_s(cfg: CognicaConfig, gpu: str, batch: int, ctx: int, sssl: bool) -> float:
    bandwidth, flops = GPUS[gpu]
    seconds = max(decode_step_bytes(cfg, batch, ctx, sssl) / bandwidth, batch * flops_per_token(cfg, ctx, sssl) / flops)
    return batch / seconds


def print_roofline() -> None:
    m = RELEASE
    gb = 1e9
    print("Decode roofline for Cognica-BP-v1.0-1.3B-base (bf16 weights and KV cache), modelled, not measured")
    print(f"  weights streamed per step: {matmul_weight_params(m) / 1e6:.1f}M params = "
          f"{matmul_weight_params(m) * DTYPE_BYTES / gb:.3f} GB (all matmul weights + lm_head)")  # fmt: skip
    print(f"  gathered per token: {gathered_bytes_per_token(m)} B (wte + {len(m.ve_layers)} value-embedding rows)")
    print(f"  KV per key per layer: {kv_bytes_per_key(m)} B; S layers read min(ctx, {m.short_window + 1}) keys, "
          "L layers ctx")
    print()
    print(f"{'ctx':>5} {'keys SSSL':>10} {'keys full':>10} {'KV MB/seq SSSL':>15} {'KV MB/seq full':>15} {'saved':>6}")
    for ctx in (512, 1024, 1536, 2048):
        s, f = keys_read(m, ctx, True), keys_read(m, ctx, False)
        kv_s, kv_f = s * kv_bytes_per_key(m) / 1e6, f * kv_bytes_per_key(m) / 1e6
        print(f"{ctx:>5} {s:>10} {f:>10} {kv_s:>15.1f} {kv_f:>15.1f} {1 - s / f:>6.0%}")
    print()
    header = f"{'gpu':<14} {'batch':>5} {'ctx':>5} {'GB/step SSSL':>13} {'GB/step full':>13} "
    print(header + f"{'tok/s SSSL':>11} {'tok/s full':>11} {'speedup':>8}")
    for gpu in GPUS:
        for batch in (1, 32, 256):
            for ctx in (512, 1024, 1536, 2048):
                b_s, b_f = decode_step_bytes(m, batch, ctx, True) / gb, decode_step_bytes(m, batch, ctx, False) / gb
                t_s = roofline_tokens_per_s(m, gpu, batch, ctx, True)
                t_f = roofline_tokens_per_s(m, gpu, batch, ctx, False)
                print(f"{gpu:<14} {batch:>5} {ctx:>5} {b_s:>13.3f} {b_f:>13.3f} {t_s:>11.0f} {t_f:>11.0f} "
                      f"{t_s / t_f:>7.2f}x")  # fmt: skip


# ----------------------------------------------------------------------------------------------- CUDA timing


def _bench(timer: Timer, fn: Callable[[], object]) -> float:
    """Median milliseconds per call (CUDA events, L2 flushed before each timed call)."""
    return timer.median_ms(fn, reps=20, warmup=3)[0]


def _decode_inputs(batch: int, ctx: int, q_len: int, page_size: int = 16) -> tuple:
    m = RELEASE
    args = paged_inputs(batch, ctx, q_len, m.n_kv_head, m.head_dim, page_size, torch.device("cuda"), seed=batch)
    return (*args, 1.44 / math.sqrt(m.head_dim))


def _flash_attn() -> Callable | None:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def run_cuda_benchmarks() -> None:
    from cognica_kernels import relu2

    m = RELEASE
    timer = Timer(torch.device("cuda"))
    print(f"device: {torch.cuda.get_device_name()}; times are medians in ms")
    print(f"{'op':<38} {'triton':>8} {'torch':>8} {'engine':>8}")
    for rows in (1, 32, 256, 8 * 2048):
        h = torch.randn(rows, m.mlp_hidden, device="cuda", dtype=torch.bfloat16)
        t_act = _bench(timer, lambda h=h: relu2.relu2_triton(h))
        r_act = _bench(timer, lambda h=h: relu2.relu2_reference(h))
        print(f"{f'relu2 [{rows}, {m.mlp_hidden}]':<38} {t_act:>8.3f} {r_act:>8.3f} {'':>8}")

    flash = _flash_attn()
    cases = [(f"decode b={b} ctx=2048", b, 2048, 1) for b in (1, 32, 256)] + [("prefill 8x2048", 8, 2048, 2048)]
    for label, batch, ctx, q_len in cases:
        args = _decode_inputs(batch, ctx, q_len)
        for window in (m.short_window, None):
            t_tri, t_ref, t_eng = _bench_attention(timer, args, window, q_len, ctx, batch <= 32, flash)
            print(f"{f'attn {label} ' + ('S' if window else 'L'):<38} {t_tri:>8.3f} {t_ref:>8.3f} {t_eng:>8.3f}")


def _bench_attention(
    timer: Timer, args: tuple, window: int | None, q_len: int, ctx: int, with_reference: bool, flash: Callable | None
) -> tuple[float, float, float]:
    """(triton, torch reference, vLLM flash-attn) ms; NaN where not run. The reference loops per sequence."""
    from cognica_kernels import attention

    t_tri = _bench(timer, lambda: attention.paged_attention_triton(*args, window, max_query_len=q_len,
                                                                   max_seq_len=ctx))  # fmt: skip
    t_ref = _bench(timer, lambda: attention.paged_attention_reference(*args, window)) if with_reference else math.nan
    t_eng = math.nan
    if flash is not None:
        q, kc, vc, bt, sl, qsl, scale = args
        t_eng = _bench(timer, lambda: flash(
            q, kc, vc, max_seqlen_q=q_len, cu_seqlens_q=qsl, max_seqlen_k=ctx, seqused_k=sl, softmax_scale=scale,
            causal=True, window_size=(window if window is not None else -1, 0), block_table=bt,
        ))  # fmt: skip
    return t_tri, t_ref, t_eng


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="store_true", help="print the roofline model even when CUDA is present")
    args = parser.parse_args()
    if args.model or not torch.cuda.is_available():
        print_roofline()
    else:
        run_cuda_benchmarks()


if __name__ == "__main__":
    main()
