"""bf16 GEMM vs the fp32-copy linear of cognica_kernels.cpu_linear, per weight shape of the 1.38B model and rows.

    .venv/vllm/bin/python benchmarks/cpu_linear.py [--threads 2]

Prints a markdown table of milliseconds per call: torch's bf16 F.linear against `UpcastLinear` forced onto its
fp32 path (x cast to fp32, MKL sgemm on the fp32 weight copy, result rounded to bf16). Where the second is faster
from some row count on, `COGNICA_CPU_LINEAR_MIN_ROWS` (default 8) should sit at that crossover.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cognica_kernels.cpu_linear import UpcastLinear, cpu_has_bf16_matmul

SHAPES = {"qkv 4608x1536": (4608, 1536), "attn c_proj 1536x1536": (1536, 1536), "c_fc 6144x1536": (6144, 1536),
          "mlp c_proj 1536x6144": (1536, 6144), "lm_head 32768x1536": (32768, 1536)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 256)


def bench(fn, n: int = 5) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU bf16 matmul instructions: "
          f"{cpu_has_bf16_matmul()}\n")
    print("| weight | " + " | ".join(f"{r} rows" for r in ROWS) + " |")
    print("|---|" + "---|" * len(ROWS))
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        up = UpcastLinear(w, rows_min=1)  # always the fp32 path
        cells = []
        for rows in ROWS:
            x = torch.randn(rows, in_f, dtype=torch.bfloat16)
            b16 = bench(lambda x=x, w=w: F.linear(x, w))
            f32 = bench(lambda x=x, up=up: up(x))
            cells.append(f"{b16:.1f} / **{f32:.1f}**" if f32 < b16 else f"**{b16:.1f}** / {f32:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("\nms per call: bf16 F.linear / fp32 copy; the faster in bold.")


if __name__ == "__main__":
    main()
