"""Kernel benchmarks on CUDA; on a machine without one, the decode roofline model of docs/performance.md.

    python benchmarks/kernels.py            # CUDA: times each kernel against torch (and vLLM's flash-attn if
                                            # importable); no CUDA: prints the bandwidth roofline table
    python benchmarks/kernels.py --model    # the roofline table even on a GPU machine

Nothing here has been run on a GPU yet: no measured numbers exist for these kernels.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

# ------------------------------------------------------------------------------------------- roofline model


@dataclass(frozen=True)
class ModelShape:
    """Cognica-BP-v1.0-1.3B-base (spec/model.md)."""

    n_layer: int = 24
    n_embd: int = 1536
    n_kv_head: int = 12
    head_dim: int = 128
    mlp_hidden: int = 6144
    vocab: int = 32768
    window_pattern: str = "SSSL"  # last layer forced to L
    short_window_left: int = 512  # S layers: the query and the 512 keys before it
    n_value_embed_layers: int = 12  # layers 1, 3, ..., 23
    dtype_bytes: int = 2  # bf16 weights and KV cache

    def is_short(self, layer: int) -> bool:
        return layer != self.n_layer - 1 and self.window_pattern[layer % len(self.window_pattern)] == "S"

    def matmul_weight_params(self) -> int:
        """Weights every decode step streams in full: c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj, ve_gate, lm_head."""
        d = self.n_embd
        per_layer = 4 * d * d + 2 * d * self.mlp_hidden
        ve_gates = self.n_value_embed_layers * self.n_kv_head * 12  # ve_gate: [n_kv_head, 12]
        return self.n_layer * per_layer + ve_gates + self.vocab * d

    def gathered_bytes_per_token(self) -> int:
        """wte and value-embedding tables are gathered: one row each per token, not the whole table."""
        return (1 + self.n_value_embed_layers) * self.n_embd * self.dtype_bytes

    def kv_bytes_per_key(self) -> int:
        """K and V of one key in one layer."""
        return 2 * self.n_kv_head * self.head_dim * self.dtype_bytes

    def keys_read(self, ctx: int, sssl: bool) -> int:
        """Keys read over all layers by one decode query with `ctx` keys in its sequence."""
        short = min(ctx, self.short_window_left + 1)
        return sum(short if sssl and self.is_short(i) else ctx for i in range(self.n_layer))

    def flops_per_token(self, ctx: int, sssl: bool) -> int:
        """2 per weight multiply-add plus QK^T and PV (4 * n_embd per key per layer)."""
        return 2 * self.matmul_weight_params() + 4 * self.n_embd * self.keys_read(ctx, sssl)


# peak HBM bandwidth (bytes/s) and dense bf16 tensor-core FLOP/s, from the vendors' data sheets
GPUS = {"H100 SXM": (3.35e12, 989e12), "A100 80GB SXM": (2.039e12, 312e12)}


def decode_step_bytes(m: ModelShape, batch: int, ctx: int, sssl: bool) -> int:
    weights = m.matmul_weight_params() * m.dtype_bytes
    per_seq = m.keys_read(ctx, sssl) * m.kv_bytes_per_key() + m.gathered_bytes_per_token()
    return weights + batch * per_seq


def roofline_tokens_per_s(m: ModelShape, gpu: str, batch: int, ctx: int, sssl: bool) -> float:
    bandwidth, flops = GPUS[gpu]
    seconds = max(decode_step_bytes(m, batch, ctx, sssl) / bandwidth, batch * m.flops_per_token(ctx, sssl) / flops)
    return batch / seconds


def print_roofline() -> None:
    m = ModelShape()
    gb = 1e9
    print("Decode roofline for Cognica-BP-v1.0-1.3B-base (bf16 weights and KV cache), modelled, not measured")
    print(f"  weights streamed per step: {m.matmul_weight_params() / 1e6:.1f}M params = "
          f"{m.matmul_weight_params() * m.dtype_bytes / gb:.3f} GB (all matmul weights + lm_head)")  # fmt: skip
    print(f"  gathered per token: {m.gathered_bytes_per_token()} B (wte + 12 value-embedding rows)")
    print(f"  KV per key per layer: {m.kv_bytes_per_key()} B; S layers read min(ctx, 513) keys, L layers ctx")
    print()
    print(f"{'ctx':>5} {'keys SSSL':>10} {'keys full':>10} {'KV MB/seq SSSL':>15} {'KV MB/seq full':>15} {'saved':>6}")
    for ctx in (512, 1024, 1536, 2048):
        s, f = m.keys_read(ctx, True), m.keys_read(ctx, False)
        kv_s, kv_f = s * m.kv_bytes_per_key() / 1e6, f * m.kv_bytes_per_key() / 1e6
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


def _bench(fn: Callable[[], object]) -> float:
    """Median milliseconds per call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _decode_inputs(batch: int, ctx: int, q_len: int, page_size: int = 16) -> tuple:
    m = ModelShape()
    heads, dim = m.n_kv_head, m.head_dim
    pages = math.ceil(ctx / page_size)
    block_table = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages)
    key_cache = torch.randn(batch * pages, page_size, heads, dim, device="cuda", dtype=torch.bfloat16)
    value_cache = torch.randn_like(key_cache)
    q = torch.randn(batch * q_len, heads, dim, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    query_start_loc = torch.arange(0, batch * q_len + 1, q_len, device="cuda", dtype=torch.int32)
    return q, key_cache, value_cache, block_table, seq_lens, query_start_loc, 1.44 / math.sqrt(dim)


def _flash_attn() -> Callable | None:
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def run_cuda_benchmarks() -> None:
    from relu2_linear import relu2_linear_reference, relu2_linear_triton  # beside this file (sys.path[0])

    from cognica_kernels import relu2

    m = ModelShape()
    print(f"device: {torch.cuda.get_device_name()}; times are medians in ms")
    print(f"{'op':<38} {'triton':>8} {'torch':>8} {'engine':>8}")
    w = torch.randn(m.mlp_hidden, m.n_embd, device="cuda", dtype=torch.bfloat16) / 40
    for rows in (1, 32, 256, 8 * 2048):
        x = torch.randn(rows, m.n_embd, device="cuda", dtype=torch.bfloat16)
        h = torch.randn(rows, m.mlp_hidden, device="cuda", dtype=torch.bfloat16)
        t_gemm = _bench(lambda x=x: relu2_linear_triton(x, w))
        r_gemm = _bench(lambda x=x: relu2_linear_reference(x, w))
        print(f"{f'relu2_linear M={rows}':<38} {t_gemm:>8.3f} {r_gemm:>8.3f} {'':>8}")
        t_act, r_act = _bench(lambda h=h: relu2.relu2_triton(h)), _bench(lambda h=h: relu2.relu2_reference(h))
        print(f"{f'relu2 [{rows}, {m.mlp_hidden}]':<38} {t_act:>8.3f} {r_act:>8.3f} {'':>8}")

    flash = _flash_attn()
    cases = [(f"decode b={b} ctx=2048", b, 2048, 1) for b in (1, 32, 256)] + [("prefill 8x2048", 8, 2048, 2048)]
    for label, batch, ctx, q_len in cases:
        args = _decode_inputs(batch, ctx, q_len)
        for window in (m.short_window_left, None):
            t_tri, t_ref, t_eng = _bench_attention(args, window, q_len, ctx, with_reference=batch <= 32, flash=flash)
            print(f"{f'attn {label} ' + ('S' if window else 'L'):<38} {t_tri:>8.3f} {t_ref:>8.3f} {t_eng:>8.3f}")


def _bench_attention(
    args: tuple, window: int | None, q_len: int, ctx: int, with_reference: bool, flash: Callable | None
) -> tuple[float, float, float]:
    """(triton, torch reference, vLLM flash-attn) ms; NaN where not run. The reference loops per sequence."""
    from cognica_kernels import attention

    t_tri = _bench(lambda: attention.paged_attention_triton(*args, window, max_query_len=q_len, max_seq_len=ctx))
    t_ref = _bench(lambda: attention.paged_attention_reference(*args, window)) if with_reference else math.nan
    t_eng = math.nan
    if flash is not None:
        q, kc, vc, bt, sl, qsl, scale = args
        t_eng = _bench(lambda: flash(
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
