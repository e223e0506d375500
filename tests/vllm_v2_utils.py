"""What the V2 tests (tests/test_vllm_v2*.py, .venv/vllm-v2) read from a running in-process `vllm.LLM`."""

from __future__ import annotations

from vllm import LLM


def _runner_class(worker) -> str:
    cls = type(worker.model_runner)
    return next(f"{c.__module__}.{c.__qualname__}" for c in cls.__mro__ if c.__qualname__ == "GPUModelRunner")


def model_runner_class(llm: LLM) -> str:
    """The GPUModelRunner the worker's runner derives from (V2: vllm.v1.worker.gpu.model_runner; the CPU runner
    `vllm.v1.worker.cpu.model_runner.CPUModelRunner` subclasses it)."""
    [name] = set(llm.collective_rpc(_runner_class))
    return name


def _kv_cache_groups(worker) -> list[list[str]]:
    return [list(g.layer_names) for g in worker.model_runner.kv_cache_config.kv_cache_groups]


def kv_cache_groups(llm: LLM) -> list[list[str]]:
    """The layer names of each KV-cache group (`KVCacheConfig.kv_cache_groups` of the runner)."""
    return llm.collective_rpc(_kv_cache_groups)[0]


def attention_impls(llm: LLM) -> list[str]:
    """The attention implementations the model's layers run (e.g. TritonAttentionImpl)."""
    return sorted({name for names in llm.apply_model(
        lambda m: [type(mod.impl).__name__ for mod in m.modules() if hasattr(mod, "impl") and hasattr(mod, "kv_cache")])
        for name in names})


def close(llm: LLM) -> None:
    """Shut the in-process engine down now (`InprocClient.shutdown`, which detaches its finalizer, so it runs once).
    Left to garbage collection, an engine still referenced (say by a failed test's traceback) is shut down later, and
    its executor's shutdown (`UniProcExecutor.shutdown` -> `destroy_model_parallel`) then tears down the parallel
    groups of whichever engine this process runs by then."""
    llm.llm_engine.engine_core.shutdown()
