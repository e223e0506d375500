"""One vLLM engine (offline `vllm.LLM`) for benchmarks/serve.py: run in .venv/vllm.

    python benchmarks/_vllm_worker.py '{"model": DIR, "label": ..., "workloads": [...], "kv_gib": 2, ...}'

Prints PROGRESS lines and one RESULT= JSON line on stdout; vLLM's own logs go to stderr.
TTFT comes from vLLM's per-request metrics (`RequestOutput.metrics.first_token_latency`, arrival -> first token,
with log stats on); the worker falls back to a max_tokens=1 run of the same prompts if they are missing.
"""

from __future__ import annotations

import json
import os
import sys
import time


def kv_capacity(llm, max_len: int) -> dict:
    """What the engine's KV cache got: blocks, groups and vLLM's own 'maximum concurrency' for max_len tokens."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    core = llm.llm_engine.engine_core.engine_core  # in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    kvc = core.scheduler.kv_cache_config
    vcfg = llm.llm_engine.vllm_config
    groups = []
    for g in kvc.kv_cache_groups:
        spec = g.kv_cache_spec
        groups.append({"layers": len(g.layer_names), "spec": type(spec).__name__,
                       "sliding_window": getattr(spec, "sliding_window", None), "block_size": spec.block_size,
                       "blocks_per_request": -(-spec.max_memory_usage_bytes(vcfg) // spec.page_size_bytes)})
    return {"num_blocks": kvc.num_blocks, "kv_bytes": sum(t.size for t in kvc.kv_cache_tensors),
            "groups": groups, "max_len": max_len,
            "max_concurrency": get_max_concurrency_for_kv_cache_config(vcfg, kvc)}


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(spec.get("kv_gib", 2)))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common import progress, run_workloads
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    args = dict(model=spec["model"], dtype="bfloat16", max_model_len=2048, seed=0,
                block_size=int(spec.get("block_size", 32)),
                gpu_memory_utilization=0.3, max_num_seqs=16,
                max_num_batched_tokens=int(spec.get("max_batched", 256)),
                enable_chunked_prefill=True, enable_prefix_caching=False, skip_tokenizer_init=True,
                disable_log_stats=False, enforce_eager=spec.get("eager", False))
    if spec.get("hf_overrides"):
        args["hf_overrides"] = spec["hf_overrides"]
    if spec.get("dummy"):
        args["load_format"] = "dummy"
    llm = LLM(**args)
    result = {"label": spec["label"], "startup_s": time.perf_counter() - t0, "engine_args": {
        k: v for k, v in args.items() if k != "model"}, "kv_gib": spec.get("kv_gib", 2)}
    progress(f"{spec['label']}: engine up in {result['startup_s']:.0f}s")
    try:
        result["kv"] = kv_capacity(llm, 2048)
        progress(f"{spec['label']}: KV {result['kv']['num_blocks']} blocks, max concurrency at 2048 tokens "
                 f"{result['kv']['max_concurrency']:.2f}")
    except Exception as e:  # noqa: BLE001  (capacity is best effort; the timings still count)
        result["kv_error"] = repr(e)

    def run(prompts: list[list[int]], n: int):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t, outs

    def request_ttfts(outs) -> list[float] | None:
        ttfts = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None
                 and getattr(o.metrics, "first_token_latency", 0) > 0]
        return ttfts if len(ttfts) == len(outs) else None

    run_workloads(result, spec, run, request_ttfts, lambda outs: [list(o.outputs[0].token_ids) for o in outs])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
