# SPDX-License-Identifier: Apache-2.0
"""The `CognicaConfig` a vLLM model instance builds (`model_config`), read by every instance: the served model and
vLLM's `draft_model` drafter (`cognica_vllm.spec_decode`), which builds the target's stage prefix instead."""

from __future__ import annotations

from dataclasses import replace

from vllm.config import VllmConfig

from cognica.config import CognicaConfig, ConfigError
from cognica.hf import cognica_config
from cognica.serving import has_sliding_layers
from cognica_vllm.config_checks import uses_v1_model_runner
from cognica_vllm.spec_decode import DRAFT_STAGE_FIELD, draft_stage, is_drafter


def model_config(vllm_config: VllmConfig) -> CognicaConfig:
    """The config a model instance builds: the served config, or, for the drafter, the target's config cut to the
    draft stage with every layer full attention and the final-layer head."""
    if not is_drafter(vllm_config):
        return cognica_config(vllm_config.model_config.hf_config)
    spec = vllm_config.speculative_config
    assert spec is not None and spec.target_model_config is not None, "a drafter needs the target's config"
    target_hf = spec.target_model_config.hf_config
    target = cognica_config(target_hf)
    stage = draft_stage(target_hf)
    if stage < 1 or stage * target.poe_every >= target.n_active_layers:
        # a drafter as deep as the target would only verify itself
        raise ConfigError(
            f"bad config: {DRAFT_STAGE_FIELD}: {stage} is not a stage prefix shallower than the target "
            f"({target.n_active_layers} layers, {target.poe_every} per stage)"
        )
    if has_sliding_layers(target, vllm_config.model_config.max_model_len) and uses_v1_model_runner(vllm_config) \
            and not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        # a backstop: cognica_vllm.config_checks already set it, or refused, in the first process
        raise ValueError(
            "self-speculative decoding of Cognica needs disable_hybrid_kv_cache_manager=True "
            "(--disable-hybrid-kv-cache-manager): vLLM's V1 model runner gives a draft model the attention metadata "
            "of KV-cache group 0, which is not the drafter's group when the target has sliding-window layers"
        )
    try:
        return replace(target, poe_exit_stage=stage, poe_head="final")
    except ConfigError as e:
        raise ConfigError(f"self-speculative drafting with the stage-{stage} prefix: {e}") from None
