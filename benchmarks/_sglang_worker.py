"""One SGLang engine (offline `sglang.Engine`) for benchmarks/serve.py: run in .venv/sglang with
`SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)"` on a machine without CUDA
(serve.py sets both).

    python benchmarks/_sglang_worker.py '{"model": DIR, "label": ..., "workloads": [...], "plugin": true}'

Prints PROGRESS lines and one RESULT= JSON line on stdout. TTFT comes from SGLang's request metrics
(`meta_info["first_token_latency"]`, with enable_metrics); without them, from a max_new_tokens=1 run of the same
prompts.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.get("plugin"):
        # Skips importing SGLang's ~250 built-in model modules in every process; the Llama run needs them.
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "cognica_sglang"
    else:
        os.environ.pop("SGLANG_EXTERNAL_MODEL_PACKAGE", None)
    import sglang
    from common import progress, run_workloads

    args = dict(device="cpu", attention_backend="torch_native", dtype="bfloat16", disable_cuda_graph=True,
                skip_server_warmup=True, skip_tokenizer_init=True,
                max_total_tokens=int(spec.get("max_total_tokens", 20480)),
                chunked_prefill_size=int(spec.get("max_batched", 256)), max_running_requests=16,
                disable_radix_cache=True, random_seed=0, log_level="error",
                enable_metrics=bool(spec.get("metrics", True)))
    t0 = time.perf_counter()
    engine = sglang.Engine(model_path=spec["model"], **args)
    try:
        result = {"label": spec["label"], "startup_s": time.perf_counter() - t0, "engine_args": args}
        progress(f"{spec['label']}: engine up in {result['startup_s']:.0f}s")
        try:
            info = engine.get_server_info()
            result["kv"] = {k: info.get(k) for k in ("max_total_num_tokens", "disable_hybrid_swa_memory",
                                                     "swa_full_tokens_ratio") if k in info}
        except Exception as e:  # noqa: BLE001
            result["kv_error"] = repr(e)

        def run(prompts: list[list[int]], n: int):
            sp = {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}
            t = time.perf_counter()
            outs = engine.generate(input_ids=prompts, sampling_params=sp)
            return time.perf_counter() - t, outs

        def request_ttfts(outs) -> list[float] | None:
            ttfts = [o["meta_info"].get("first_token_latency") for o in outs]
            return ttfts if all(isinstance(x, float) and x > 0 for x in ttfts) else None

        run_workloads(result, spec, run, request_ttfts, lambda outs: [o["output_ids"] for o in outs])
    finally:
        engine.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
