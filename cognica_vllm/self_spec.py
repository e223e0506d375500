# SPDX-License-Identifier: Apache-2.0
"""`--speculative-config '{"method": "cognica_self", "num_speculative_tokens": k}'`: PoE self-speculation that shares
the target's weights and KV cache (vLLM >= 0.34).

The PoE twin's stage ends are trained predictors through the shared norm, head and soft-cap, so the drafter is the
target's own first `poe_draft_stage` stages (default 1; the target's `--hf-overrides '{"poe_draft_stage": 2}'`):
the target's modules for layers 0..S-1, the target's KV cache for those layers, then the shared head. It has no
parameters and no attention layers of its own, so vLLM allocates no KV cache for it and the KV-cache configuration
is the one without speculation, hybrid groups (the SSSL windows' saving) included; only the `k` lookahead slots per
request that every drafter needs are added. Three modules, as vLLM lays out its own speculators: this one (every
vLLM version: registration and the first-process refusals), `cognica_vllm.self_spec_config` (the `SpeculatorConfig`,
imported in every process; vLLM's `speculator_config.py`: config modules must not import the speculators) and
`cognica_vllm.self_spec_speculator` (the worker's speculator and drafter). Registered through vLLM 0.34's
experimental `register_speculative_method`.

Versus `draft_model` with our own directory (`cognica_vllm.spec_decode`): that builds the model class a second time
(a second copy of the stage layers, value-embedding tables, wte and lm_head; its own KV for the stage layers) and
computes the stage layers twice for every drafted token.
"""

from __future__ import annotations

METHOD = "cognica_self"
HOOK = "vllm.v1.worker.gpu.spec_decode.speculator_config"  # register_speculative_method: vLLM >= 0.34


def has_speculator_hook() -> bool:
    """Whether this vLLM has the speculative-method hook (0.34 added it; decided by the module, not the version
    string)."""
    from importlib.util import find_spec

    return find_spec(HOOK) is not None


def is_self_spec(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    return spec is not None and getattr(spec, "custom_method", None) == METHOD


def refusals(vllm_config) -> list[str]:
    """Why `cognica_self` cannot serve this config, one clause each (empty: it can). Run in the first process by
    `cognica_vllm.config_checks.CognicaConfigChecks`."""
    if not is_self_spec(vllm_config):
        return []
    from dataclasses import replace

    from cognica.config import ConfigError
    from cognica.hf import cognica_config
    from cognica_vllm.spec_decode import draft_stage

    found = []
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        found.append("pipeline parallelism (the drafter runs the first stage's layers and the head, which sit on "
                     "different pipeline ranks): use pipeline_parallel_size=1")
    if vllm_config.lora_config is not None:
        found.append("LoRA (the drafter would run the base layers without the adapters; untested): serve without "
                     "--enable-lora")
    hf = vllm_config.model_config.hf_config
    target = cognica_config(hf)
    try:
        stage = draft_stage(hf)
        if stage < 1 or stage * target.poe_every >= target.n_active_layers:
            found.append(f"poe_draft_stage={stage} is not a stage prefix shallower than the target "
                         f"({target.n_active_layers} layers, {target.poe_every} per stage)")
        else:
            replace(target, poe_exit_stage=stage, poe_head="final")
    except ConfigError as e:  # a BP checkpoint (poe_mode='none') without poe_force, a bad poe_draft_stage
        found.append(str(e).removeprefix("bad config: "))
    return found


def register() -> None:
    """Called by `cognica_vllm.register()`; a no-op before vLLM 0.34, where no plugin hook runs before vLLM's own
    validation of `SpeculativeConfig.method` (a pydantic Literal in 0.32) refuses the name, listing `draft_model`
    among the methods it knows."""
    if not has_speculator_hook():
        return
    from vllm.v1.worker.gpu.spec_decode.speculator_config import register_speculative_method

    # by name: resolved only where the method is asked for
    register_speculative_method(METHOD, "cognica_vllm.self_spec_config.CognicaSelfSpeculatorConfig")
