"""Run-time KV capacity on vLLM: how many long requests a fixed KV budget actually runs at once, SSSL windows vs the
same model with every layer full, and what that does to preemptions and throughput.

vLLM's start-up "maximum concurrency" counts a sliding layer as holding min(window - 1 + max_num_batched_tokens,
max_model_len) tokens per request (`SlidingWindowSpec.max_admission_blocks_per_request` in
vllm/v1/kv_cache_interface.py), so at the default batch size it reports almost no saving for the windows. At run time
the scheduler frees a sliding layer's blocks once they leave the window
(`SingleTypeKVCacheManager.remove_skipped_blocks` and `SlidingWindowManager.get_num_skipped_tokens` in
vllm/v1/core/single_type_kv_cache_manager.py), which is the saving users get. This script measures it:

    .venv/vllm/bin/python benchmarks/kv_runtime.py                 # small preset, float32, the four runs below
    .venv/vllm/bin/python benchmarks/kv_runtime.py --quick         # a 2-minute try-out

For each of {SSSL, all-full (hf_overrides window_pattern "L")} x {vLLM's default max_num_batched_tokens, a small
one}, one in-process engine (its own subprocess) gets the same KV budget (`kv_cache_memory_bytes`), the same N
requests of P prompt + G generated tokens (greedy, ignore_eos) all at once, and is stepped to completion. Reported:
the peak number of running requests (len(scheduler.running) after each step, the value vLLM's SchedulerStats
reports as num_running_reqs), the preemption count (vLLM's own Prometheus counter `vllm:num_preemptions`), the
start-up estimate (`get_max_concurrency_for_kv_cache_config`), generated and total tokens/s. Results are appended
to benchmarks/results/kv_runtime.jsonl; the table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "kv_runtime.jsonl"
RESULT_PREFIX = "RESULT="


def worker(spec: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine core: the scheduler is readable
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    from vllm import LLM, SamplingParams
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    args = dict(model=spec["model"], dtype=spec["dtype"], max_model_len=2048, seed=0, block_size=32,
                kv_cache_memory_bytes=spec["kv_bytes"], enable_prefix_caching=False, skip_tokenizer_init=True,
                disable_log_stats=False, enforce_eager=True)
    if spec["batched"]:
        args["max_num_batched_tokens"] = spec["batched"]
    if spec["all_full"]:
        args["hf_overrides"] = {"window_pattern": "L"}
    t0 = time.perf_counter()
    llm = LLM(**args)
    startup = time.perf_counter() - t0
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    sched = core.scheduler
    vcfg = engine.vllm_config
    kvc = sched.kv_cache_config
    estimate = get_max_concurrency_for_kv_cache_config(vcfg, kvc)

    import random

    rng = random.Random(1234)
    sp = SamplingParams(max_tokens=spec["new"], temperature=0.0, ignore_eos=True, detokenize=False)
    for i in range(spec["requests"]):
        prompt = [32759] + [rng.randrange(0, 32759) for _ in range(spec["prompt"] - 1)]
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, sp)
    peak, steps, generated = 0, 0, 0
    running_trace: list[int] = []
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                generated += len(out.outputs[0].token_ids)
        steps += 1
        running = len(sched.running)
        running_trace.append(running)
        peak = max(peak, running)
    wall = time.perf_counter() - t0
    preemptions = sum(int(m.value) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    groups = [{"layers": len(g.layer_names), "spec": type(g.kv_cache_spec).__name__,
               "sliding_window": getattr(g.kv_cache_spec, "sliding_window", None)} for g in kvc.kv_cache_groups]
    return {"label": spec["label"], "num_blocks": kvc.num_blocks, "groups": groups,
            "max_num_batched_tokens": vcfg.scheduler_config.max_num_batched_tokens,
            "max_num_seqs": vcfg.scheduler_config.max_num_seqs, "startup_estimate": estimate,
            "peak_running": peak, "mean_running": sum(running_trace) / max(len(running_trace), 1),
            "preemptions": preemptions, "steps": steps, "wall_s": wall, "startup_s": startup,
            "generated": generated, "gen_tok_s": generated / wall,
            "total_tok_s": spec["requests"] * (spec["prompt"] + spec["new"]) / wall}


def run_one(spec: dict, log: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    with open(log, "a") as f:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"{spec['label']}: worker failed (exit {proc.returncode}); see {log}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--preset", default="small", help="factory preset (small: 8 layers SSSL, context 2048)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-mib", type=int, default=256, help="KV budget per engine (kv_cache_memory_bytes)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=1900)
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--batched", default="default,256",
                    help="max_num_batched_tokens values; 'default' leaves vLLM's (4096 for LLM on CPU)")
    ap.add_argument("--quick", action="store_true", help="8 requests of 1900+8 tokens, one batch size")
    args = ap.parse_args()
    if args.worker:
        print(RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.quick:
        args.requests, args.new, args.batched = 8, 8, "default"
    sys.path.insert(0, str(ROOT))
    from cognica.factory import make_checkpoint

    batched = [0 if b == "default" else int(b) for b in args.batched.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(Path(tmp) / args.preset, preset=args.preset, seed=0, progress=False)
        log = Path(tmp) / "engines.log"
        for b in batched:
            for all_full in (False, True):
                label = f"{'all-full' if all_full else 'SSSL'}, batched={'default' if not b else b}"
                spec = {"model": str(model), "dtype": args.dtype, "kv_bytes": args.kv_mib << 20, "batched": b,
                        "all_full": all_full, "requests": args.requests, "prompt": args.prompt, "new": args.new,
                        "label": label}
                print(f"[kv_runtime] {label}: running {args.requests} x ({args.prompt}+{args.new})", flush=True)
                try:
                    r = run_one(spec, log)
                except SystemExit:
                    print(Path(log).read_text()[-4000:], file=sys.stderr)
                    raise
                print(f"[kv_runtime] {label}: peak running {r['peak_running']}, preemptions {r['preemptions']}, "
                      f"{r['total_tok_s']:.0f} tok/s", flush=True)
                rows.append(r)
    lines = [f"Run-time KV capacity, vLLM {args.preset} preset ({args.dtype}), KV budget {args.kv_mib} MiB, "
             f"{args.requests} requests x ({args.prompt} prompt + {args.new} new), block 32, eager",
             "", "| windows | max_num_batched_tokens | start-up estimate (2048-token seqs) | peak running | "
             "mean running | preemptions | steps | total tok/s | generated tok/s |", "|---|---:|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label'].split(',')[0]} | {r['max_num_batched_tokens']} | {r['startup_estimate']:.2f} | "
                     f"{r['peak_running']} | {r['mean_running']:.1f} | {r['preemptions']} | {r['steps']} | "
                     f"{r['total_tok_s']:.0f} | {r['gen_tok_s']:.1f} |")
    by = {(r["label"].split(",")[0], r["max_num_batched_tokens"]): r for r in rows}
    lines.append("")
    for b in sorted({r["max_num_batched_tokens"] for r in rows}):
        s, f = by.get(("SSSL", b)), by.get(("all-full", b))
        if s and f:
            est = s["startup_estimate"] / f["startup_estimate"]
            lines.append(f"batched={b}: SSSL / all-full: start-up estimate {est:.2f}x, "
                         f"peak running {s['peak_running'] / max(f['peak_running'], 1):.2f}x, "
                         f"throughput {s['total_tok_s'] / f['total_tok_s']:.2f}x")
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "args": vars(args),
                            "host": platform.node(), "load_avg": os.getloadavg(), "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
