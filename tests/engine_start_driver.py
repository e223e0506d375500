"""Try to start an engine on each of several checkpoint directories and print, as JSON, how each failed.

A separate process (not a pytest test): engines need a `__main__` guard and must not share the test process.
Used by the bad-checkpoint engine-start tests of tests/vllm/test_server.py and tests/sglang/test_parity.py.
    python -m tests.engine_start_driver vllm|sglang '{"variant": "/path/to/ckpt", ...}'

Each result also counts the processes the attempt started. Both engines start their engine processes with
`multiprocessing` (vLLM's engine core: `proc.start()` in `CoreEngineProcManager.__init__`, vllm/v1/engine/utils.py,
after the config is built in `LLMEngine.from_engine_args`, vllm/v1/engine/llm_engine.py; SGLang's scheduler and
detokenizer: `Engine._launch_subprocesses`, called by `Engine.__init__` in sglang/srt/entrypoints/engine.py), so a
refusal "in the first process" means zero `BaseProcess.start` calls. The wrapper only counts; it changes nothing the
engine sees.
"""

import json
import multiprocessing.process
import sys
import time

STARTED: list[str] = []
_start = multiprocessing.process.BaseProcess.start


def _counting_start(self: multiprocessing.process.BaseProcess) -> None:
    STARTED.append(self.name)
    _start(self)


if __name__ == "__main__":
    engine, dirs = sys.argv[1], json.loads(sys.argv[2])
    __import__("vllm" if engine == "vllm" else "sglang")  # the engine import is not part of failing fast
    multiprocessing.process.BaseProcess.start = _counting_start
    results = {}
    for name, model in dirs.items():
        start, STARTED[:] = time.time(), []
        try:
            if engine == "vllm":
                from vllm import LLM

                LLM(model=model, skip_tokenizer_init=True, max_model_len=1024, gpu_memory_utilization=0.3)
            else:
                import sglang

                # log_level info: a KV-pool allocation would be logged ("KV Cache is allocated"), and the test
                # asserts that no such line appears
                sglang.Engine(model_path=model, device="cpu", attention_backend="torch_native",
                              skip_tokenizer_init=True, disable_cuda_graph=True, skip_server_warmup=True,
                              max_total_tokens=4096, log_level="info")
            results[name] = {"error": None, "seconds": time.time() - start, "processes": list(STARTED)}
            break  # an engine that started holds the machine: stop here, the test fails on this entry
        except Exception as e:  # the test asserts on the message
            results[name] = {"error": f"{type(e).__name__}: {e}", "seconds": time.time() - start,
                             "processes": list(STARTED)}
    print("RESULTS=" + json.dumps(results), flush=True)
