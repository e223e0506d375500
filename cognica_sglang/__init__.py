"""SGLang plugin for Cognica (nanochat GPT): `register()` is the `sglang.srt.plugins` entry point.

SGLang calls it in every process (engine, scheduler, detokenizer, data-parallel controller)
before it parses server arguments. It registers the config and the tokenizer class with
transformers (no `trust_remote_code`), the model under every architecture string in
`cognica.config.ARCHITECTURE_ALIASES`, and one config-time override (`keeps_swa_pool`): with the
`torch_native` backend (the CPU default) the hybrid sliding-window KV pool is turned off, because that
backend reads sliding layers' keys with untranslated full-pool slots (windows still apply; only the memory
saving is lost). CUDA backends (triton, flashinfer, fa3) keep the small sliding-window pool, and so does
the triton backend on a CPU (Triton's interpreter).
`SGLANG_EXTERNAL_MODEL_PACKAGE=cognica_sglang` also works: SGLang then imports
`cognica_sglang.model` and reads its `EntryClass`.
"""

from __future__ import annotations

from typing import Any


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


def _attention_overrides(server_args: Any, hf_config: Any) -> dict:
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


def _check_stage_options(server_args: Any, hf_config: Any) -> dict:
    """Validate the PoE stage options (`--json-model-override-args '{"poe_exit_stage": 1}'`), and refuse an attention
    backend that gets the sliding windows wrong (`cognica_sglang.attention.check_attention_backends`), a quantized
    checkpoint on a CPU (`cognica_sglang.quant.check_quantization`), LoRA where SGLang cannot run it
    (`cognica_sglang.lora.check_lora_server_args`) and the Log-OP head in embedding mode, in the first process:
    SGLang calls model overrides on the config with those args applied (`handle_model_specific_adjustments` in
    sglang/srt/arg_groups/model_hook.py), before any scheduler starts; a refusal raised later, in the scheduler, only
    kills the engine (SIGQUIT)."""
    from sglang.srt.arg_groups.model_override_base import attention_backends_of, resolving_view

    from cognica.hf import cognica_config
    from cognica_sglang.attention import check_attention_backends
    from cognica_sglang.quant import check_quantization

    cfg = cognica_config(hf_config)  # ConfigError, e.g. a stage exit on a poe_mode="none" (BP) checkpoint without force
    view = resolving_view(server_args)
    check_attention_backends(attention_backends_of(view))  # a backend that gets the sliding windows wrong
    check_quantization(None, hf_config, view.device)  # SGLang's quantized layers are CUDA-only
    if getattr(view, "enable_lora", False) or getattr(view, "lora_paths", None):
        from cognica_sglang.lora import check_lora_server_args

        check_lora_server_args(view)  # no CUDA driver: SGLang's LoRA layers cannot pin host memory
    if cfg.poe_head == "logop" and getattr(view, "is_embedding", False):
        raise ValueError("cognica: --is-embedding pools the final hidden state, which the Log-OP head "
                         "(poe_head='logop') does not have (it combines several stage ends); serve it without "
                         "poe_head='logop'")
    return {}


def _refuse_requests_that_crash_the_scheduler(manager: Any, obj: Any, input_ids: list[int], *args: Any,
                                              **kwargs: Any) -> None:
    """BEFORE hook on TokenizerManager._validate_one_request (SGLang's plugin HookRegistry). SGLang 0.5.23 range-checks
    neither prompt token ids (an id >= vocab_size crashes the scheduler in the embedding lookup) nor the number of
    top logprobs (more than the vocab crashes `topk`); prompt embeddings (`input_embeds`, which the tokenizer manager
    passes on with `--disable-radix-cache`) would raise inside the scheduler's forward and drop the connection, and
    embeddings placed at positions (`positional_embed_overrides`, GenerateReqInput's field) would replace rows the
    value embeddings and smear compute from token ids.
    A ValueError here becomes a 400 and the server keeps serving."""
    cfg = manager.model_config
    if getattr(cfg.hf_config, "model_type", None) != "cognica_poe":
        return None
    if getattr(obj, "input_embeds", None) is not None:
        raise ValueError("cognica: input_embeds are not supported (value embeddings and smear need token ids); "
                         "send text or input_ids")
    if getattr(obj, "positional_embed_overrides", None) is not None:
        raise ValueError("cognica: positional_embed_overrides are not supported (value embeddings and smear read "
                         "token ids, not embeddings); send text or input_ids")
    bad = next((t for t in input_ids or () if not isinstance(t, int) or t < 0 or t >= cfg.vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad!r} is out of range: valid ids are 0..{cfg.vocab_size - 1}")
    top = getattr(obj, "top_logprobs_num", None)
    for n in top if isinstance(top, list) else [top]:
        if isinstance(n, int) and n > cfg.vocab_size:
            raise ValueError(f"logprobs={n} asks for more alternatives than the {cfg.vocab_size}-token vocabulary")
    return None


# what register() has registered in this process (SGLang calls it more than once: engine, scheduler, detokenizer);
# our own record, so idempotence reads no SGLang private
_registered: set[str] = set()


def register() -> None:
    """Register the config, the model classes, the CPU override and the plugin hooks (request checks, LoRA names:
    `cognica_sglang.lora.LORA_HOOKS`) with SGLang (idempotent)."""
    from cognica.hf import register as register_config

    register_config()  # config, reference model and the BOS-once tokenizer class: no remote code
    from sglang.srt.arg_groups.model_override_base import register_model_override
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from cognica_sglang.model import EntryClass

    for cls in EntryClass:
        ModelRegistry.models.setdefault(cls.__name__, cls)
        if cls.__name__ not in _registered:
            for fn in (_attention_overrides, _check_stage_options):
                register_model_override(cls.__name__)(fn)
            _registered.add(cls.__name__)
    from cognica_sglang.lora import LORA_HOOKS

    hooks = [("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
              _refuse_requests_that_crash_the_scheduler, "BEFORE"), *LORA_HOOKS]
    for target, hook, kind in hooks:
        if target not in _registered:
            HookRegistry.register(target, hook, HookType[kind])
            _registered.add(target)
