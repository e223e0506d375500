"""Soak an engine's OpenAI server on 127.0.0.1 with our plugin: N requests, C concurrent, mixed prompt lengths
(some past the 512-key window) and mixed streaming / non-streaming, bounded in count and time. Every greedy
answer is compared with the same request run alone; server RSS is reported before and after.

    .venv/vllm/bin/python benchmarks/soak.py --engine vllm
    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/sgl_stub .venv/sglang/bin/python benchmarks/soak.py --engine sglang

Results are appended as JSON lines to benchmarks/results/soak.jsonl.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cognica.factory import make_checkpoint  # noqa: E402
from cognica.tokenizer import convert_tokenizer  # noqa: E402
from tests.server_utils import free_port, serve, soak  # noqa: E402

PROMPTS = [
    "Hi", "The capital of France is", "Once upon a time, " * 8, "word " * 300, "def f(x):\n    return x\n" * 60,
    "The quick brown fox jumps over the lazy dog. " * 60, "1 2 3 4 5 6 7 8 9 10 " * 40, "x" * 900,
]


def server_cmd(engine: str, model: Path, port: int, dtype: str) -> tuple[list[str], dict[str, str]]:
    if engine == "vllm":
        return ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                 "127.0.0.1", "--port", str(port), "--max-model-len", "2048", "--gpu-memory-utilization", "0.3",
                 "--max-num-seqs", "16", "--dtype", dtype], {"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"})
    return ([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
             "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
             "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "32768"],
            {"SGLANG_USE_CPU_ENGINE": "1", "PYTHONPATH": str(ROOT / "tests" / "sgl_stub")})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=["vllm", "sglang"], required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--preset", default="small", help="factory checkpoint preset (context 2048, S window 512)")
    ap.add_argument("--deadline", type=float, default=1800, help="seconds for the whole soak")
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default) makes greedy answers batch-invariant, so 'equal to the request alone' is "
                         "exact; bf16 GEMMs round differently at different batch sizes and can flip near-ties")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(Path(tmp) / args.preset, preset=args.preset, seed=0)
        convert_tokenizer(model)
        port = free_port()
        cmd, env = server_cmd(args.engine, model, port, args.dtype)
        print(f"[soak] starting {args.engine} server on 127.0.0.1:{port}", flush=True)
        with serve(cmd, "default" if args.engine == "sglang" else str(model), port, Path(tmp) / "server.log",
                   env) as server:
            print(f"[soak] {args.requests} requests, {args.concurrency} concurrent, max_tokens {args.max_tokens}",
                  flush=True)
            stats = soak(server, PROMPTS, args.requests, args.concurrency, args.max_tokens, args.deadline)
    stats.update(engine=args.engine, preset=args.preset, dtype=args.dtype, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                 machine=f"{platform.machine()} {platform.processor()} cores={__import__('os').cpu_count()}",
                 commit=subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True).stdout.strip())
    stats["mismatches"] = len(stats["mismatches"])
    print("| engine | dtype | requests | concurrency | answered | failures | greedy mismatches | max latency s "
          "| wall s | RSS before MiB | RSS after MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {args.engine} | {args.dtype} | {stats['requests']} | {stats['concurrency']} | {stats['answered']}"
          f" | {stats['failures']} | {stats['mismatches']} | {stats['max_latency_s']:.1f} | {stats['wall_s']:.0f}"
          f" | {stats['rss_before_mib']:.0f} | {stats['rss_after_mib']:.0f} |")
    out = ROOT / "benchmarks" / "results" / "soak.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(stats) + "\n")
    sys.exit(0 if stats["failures"] == 0 and stats["mismatches"] == 0 else 1)


if __name__ == "__main__":
    main()
