"""First-process config checks of the vLLM plugin (cognica_vllm.config_checks): each refused setting fails in
`EngineArgs.create_engine_config` with one line, before any worker starts, and self-speculative decoding turns
the hybrid KV-cache manager off by itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm_utils import engine_config, make_poe_checkpoint

SPEC = {"method": "draft_model", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_poe_checkpoint(tmp_path_factory.mktemp("poe") / "poe")


def test_self_speculative_turns_the_hybrid_kv_cache_manager_off(ckpt):
    cfg = engine_config(ckpt, speculative_config={**SPEC, "model": str(ckpt)})
    assert cfg.scheduler_config.disable_hybrid_kv_cache_manager is True, \
        "draft_model self-speculation of a sliding-window target must run with one KV-cache group"


def test_plain_serving_keeps_the_hybrid_kv_cache_manager(ckpt):
    cfg = engine_config(ckpt)
    assert cfg.scheduler_config.disable_hybrid_kv_cache_manager is False, \
        "without speculation the sliding layers keep their KV saving"


def test_self_speculative_with_the_hybrid_manager_forced_on_is_refused(ckpt):
    with pytest.raises(ValueError, match="self-speculative decoding of Cognica needs disable_hybrid_kv_cache"):
        engine_config(ckpt, speculative_config={**SPEC, "model": str(ckpt)}, disable_hybrid_kv_cache_manager=False)


@pytest.mark.parametrize("kw, flag", [
    ({"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
    ({"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}}, "--kv-transfer-config"),
    ({"kv_offloading_size": 1.0}, "--kv-offloading-size"),
])
def test_modes_that_bypass_token_ids_are_refused_at_start(ckpt, kw, flag):
    with pytest.raises(ValueError, match="smear reads the previous token") as e:
        engine_config(ckpt, **kw)
    assert flag in str(e.value), f"the refusal must name {flag}: {e.value}"
