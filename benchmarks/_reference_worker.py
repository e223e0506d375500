"""The core reference model's KV-cache generate in eager PyTorch (what `trust_remote_code` users run today), for
benchmarks/serve.py: run in .venv/vllm (any venv with torch and this package).

    python benchmarks/_reference_worker.py '{"model": DIR, "label": ..., "workloads": [...], "threads": 2}'

`CognicaGPT.generate` batches equal-length prompts with a KV cache: one call per workload (16 prompts = one batch).
TTFT = the end of generate's first forward (the prefill), timed with a forward hook: no extra run.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    spec = json.loads(sys.argv[1])
    import torch
    from common import WARMUP, emit, measurement, progress, workloads_from_json

    from cognica.model import load_reference

    torch.set_num_threads(int(spec.get("threads", 2)))
    t0 = time.perf_counter()
    model = load_reference(spec["model"], dtype=torch.bfloat16)
    result = {"label": spec["label"], "startup_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads(),
              "dtype": "bfloat16"}
    progress(f"{spec['label']}: model loaded in {result['startup_s']:.0f}s")

    ends: list[float] = []
    model.register_forward_hook(lambda *_: ends.append(time.perf_counter()))

    def run(prompts: list[list[int]], n: int):
        ends.clear()
        t = time.perf_counter()
        outs = model.generate(prompts, n)
        return time.perf_counter() - t, ends[0] - t, outs

    model.generate(WARMUP.prompts(), WARMUP.new_tokens)
    result["measurements"] = []
    for w in workloads_from_json(spec.get("workloads", [])):
        wall, ttft, outs = run(w.prompts(), w.new_tokens)
        result["measurements"].append(measurement(w, wall, ttft, ttft, "end of the prefill forward", outs))
        emit(result)
    emit(result, final=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
