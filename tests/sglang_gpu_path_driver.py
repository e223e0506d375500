"""SGLang's GPU attention path on this CPU: one engine with the triton backend and the hybrid SWA KV pool, run
under Triton's interpreter, answering a fixed plan of requests; prints the outputs as JSON for
tests/sglang_gpu_path/test_gpu_path.py, which compares them with the reference.

A separate process, so that the test can put a hard timeout on it (a bad kernel launch hangs `sglang.Engine` rather
than raising) and so that `TRITON_INTERPRET=1` is set before anything imports triton:
    TRITON_INTERPRET=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        python -m tests.sglang_gpu_path_driver CKPT '{"plan": [...], "engine": {...}}'

What makes SGLang's CUDA path run here, and why (test tree only, never shipped):
- `TRITON_INTERPRET=1`: Triton has no CPU backend; the interpreter runs the backend's kernels on CPU tensors.
- `SGLANG_USE_CPU_ENGINE=1` and `cognica sglang-cpu-path` on PYTHONPATH: SGLang's CPU engine, and a stand-in for the
  CUDA-only `sgl_kernel` wheel (its stubs raise if called; nothing in the triton backend calls one).
- `device="cpu", attention_backend="triton"`: the plugin keeps the hybrid SWA pool for the triton backend on a CPU
  (`cognica_sglang.config_checks.keeps_swa_pool`); `disable_cuda_graph=True`: no graphs without CUDA.
The plan: each entry is a batch of token-id prompts sent together (greedy, logprobs from position 0), or
`{"continues": [batch, request], "extra": ids}`: that earlier request's prompt and output followed by `extra`, with
prompt log-probs from the last cached token on.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(ckpt: str, spec: dict) -> dict:
    import sglang

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = "cognica_sglang"  # skip importing SGLang's built-in model modules
    t0 = time.time()
    engine = sglang.Engine(model_path=ckpt, device="cpu", attention_backend="triton", disable_cuda_graph=True,
                           dtype="float32", skip_server_warmup=True, skip_tokenizer_init=True, random_seed=0,
                           log_level="info", **spec["engine"])
    started = time.time() - t0
    try:
        batches = []
        for batch in spec["plan"]:
            t = time.time()
            if "continues" in batch:  # a finished request's prompt and output, then new tokens: a radix-cache hit
                b, r = batch["continues"]
                earlier = batches[b]["outputs"][r]
                batch["prompts"] = [spec["plan"][b]["prompts"][r] + earlier["output_ids"] + batch["extra"]]
                # prompt log-probs from before the cached prefix would forbid the hit (SGLang recomputes them)
                batch["logprob_start"] = len(batch["prompts"][0]) - len(batch["extra"]) - 1
            out = engine.generate(input_ids=batch["prompts"],
                                  sampling_params={"max_new_tokens": batch["max_new"], "temperature": 0.0,
                                                   "ignore_eos": True},
                                  return_logprob=True, logprob_start_len=batch.get("logprob_start", 0))
            batches.append({"prompts": batch["prompts"], "outputs": out, "seconds": time.time() - t})
        info = engine.get_server_info()
        backends = (info.get("prefill_attention_backend") or info.get("attention_backend"),
                    info.get("decode_attention_backend") or info.get("attention_backend"))
        return {"start_seconds": started, "batches": batches, "attention_backends": backends,
                "disable_hybrid_swa_memory": info.get("disable_hybrid_swa_memory")}
    finally:
        engine.shutdown()


if __name__ == "__main__":
    result = main(sys.argv[1], json.loads(sys.argv[2]))
    print("RESULT=" + json.dumps(result), flush=True)
