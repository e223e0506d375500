"""First-process checks of SGLang's server arguments for Cognica: the SGLang twin of `cognica_vllm.config_checks`.

SGLang runs the model overrides registered for an architecture (`register_model_override`,
sglang/srt/arg_groups/model_override_base.py) on the server arguments in `handle_model_specific_adjustments`
(sglang/srt/arg_groups/model_hook.py), in the user's process, before any scheduler starts and before
`handle_attention_backend_compatibility` picks a default attention backend. `cognica_sglang.register()` registers
`attention_overrides` (the backend where SGLang's default is wrong, the hybrid SWA pool where the backend cannot use
it) and `check_server_args` (every refusal, each one line). A refusal raised later, in the scheduler, only kills the
engine (SIGQUIT); the model's `__init__` keeps a backstop for what is only known there (the resolved backends).
"""

from __future__ import annotations

from typing import Any

from cognica.serving import ServingSettings, refuse


def serves_on_cpu(device: str | None) -> bool:
    """Whether SGLang's `--device` (None: chosen by SGLang, a CPU when there is no CUDA) is a CPU."""
    if device is None:
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def keeps_swa_pool(device: str | None, backends: tuple) -> bool:
    """Whether the hybrid sliding-window KV pool stays on for SGLang's `--device` and (prefill, decode) attention
    backends. Off with `torch_native`, which reads sliding layers' keys through untranslated full-pool slots (it
    crashed, and could read wrong keys silently). On a CPU, on only when both backends are `triton`: the one backend
    that runs there with the pool (under Triton's interpreter, tested) and translates slots into the SWA sub-pool
    (`update_sliding_window_buffer` in sglang/srt/layers/attention/triton_backend.py); the CPU default stays off."""
    if "torch_native" in backends:
        return False
    return not serves_on_cpu(device) or all(b == "triton" for b in backends)


def attention_overrides(server_args: Any, hf_config: Any) -> dict:
    """The attention backend where the user named none and SGLang's own default would be wrong (on ROCm: aiter, one
    key short on sliding layers, `cognica_sglang.attention.WRONG_WINDOW_BACKENDS`; triton instead, as SGLang's own
    gpt-oss override picks backends in sglang/srt/arg_groups/model_overrides/gpt_oss.py), and the hybrid SWA pool off
    where `keeps_swa_pool` says so. SGLang's default elsewhere (fa3 on Hopper, flashinfer on Ampere, trtllm_mha on
    Blackwell) is left alone: they count the window right."""
    from sglang.srt.arg_groups.model_override_base import (
        attention_backends_of,
        is_attention_backend_not_set,
        resolving_view,
    )
    from sglang.srt.runtime_context import get_platform

    cfg = resolving_view(server_args)
    out: dict = {}
    backends = attention_backends_of(cfg)
    if is_attention_backend_not_set(cfg) and get_platform().is_hip:
        out["attention_backend"] = "triton"
        backends = ("triton", "triton")
    if not keeps_swa_pool(cfg.device, backends):
        out["disable_hybrid_swa_memory"] = True
    return out


def serving_settings(view: Any) -> ServingSettings:
    """SGLang's server arguments (as resolved: `resolving_view`) in the terms of `cognica.serving.refusals`.
    `--is-embedding` pools the final hidden state (the model's `Pooler`). With tp > 1 SGLang's LogitsProcessor applies
    the head to each rank's vocabulary shard before gathering (`LogitsProcessor._compute_lm_head`), where the
    Log-OP head's per-stage log_softmax would run. The served context is left to the model (`check_before_build`),
    which SGLang builds after its own context check."""
    from cognica_sglang.smear import unsupported_modes

    tp = getattr(view, "tp_size", 1) or 1
    return ServingSettings(foreign_kv=tuple(unsupported_modes(view)),
                           pooling="--is-embedding" if getattr(view, "is_embedding", False) else None,
                           tensor_parallel=tp, pipeline_parallel=getattr(view, "pp_size", 1) or 1,
                           head_on_vocab_shard=tp > 1)


def check_server_args(server_args: Any, hf_config: Any) -> dict:
    """Validate the PoE stage options (`--json-model-override-args '{"poe_exit_stage": 1}'`), and refuse what
    `cognica.serving.refusals` refuses (the modes that fill KV slots without our forward, the Log-OP head in
    embedding mode or with tensor parallelism, a tensor-parallel size that cannot shard the heads), an attention
    backend that gets the sliding windows wrong (`cognica_sglang.attention.check_attention_backends`), a quantized
    checkpoint on a CPU (`cognica_sglang.quant.check_quantization`) and LoRA where SGLang cannot run it
    (`cognica_sglang.lora.check_lora_server_args`), in the first process: SGLang calls model overrides on the config
    with those args applied (`handle_model_specific_adjustments` in sglang/srt/arg_groups/model_hook.py), before any
    scheduler starts; a refusal raised later, in the scheduler, only kills the engine (SIGQUIT)."""
    from sglang.srt.arg_groups.model_override_base import attention_backends_of, resolving_view

    from cognica.hf import cognica_config
    from cognica_sglang.attention import check_attention_backends
    from cognica_sglang.quant import check_quantization

    cfg = cognica_config(hf_config)  # ConfigError, e.g. a stage exit on a poe_mode="none" (BP) checkpoint without force
    view = resolving_view(server_args)
    refuse(cfg, serving_settings(view))
    check_attention_backends(attention_backends_of(view))  # a backend that gets the sliding windows wrong
    check_quantization(None, hf_config, view.device)  # SGLang's quantized layers are CUDA-only
    if getattr(view, "enable_lora", False) or getattr(view, "lora_paths", None):
        from cognica_sglang.lora import check_lora_server_args

        check_lora_server_args(view)  # no CUDA driver: SGLang's LoRA layers cannot pin host memory
    return {}
