"""SGLang plugin for Cognica (nanochat GPT): `register()` is the `sglang.srt.plugins` entry point.

SGLang calls it in every process (engine, scheduler, detokenizer, data-parallel controller)
before it parses server arguments. It registers the config and the tokenizer class with
transformers (no `trust_remote_code`), the model under every architecture string in
`cognica.config.ARCHITECTURE_ALIASES`, the first-process config checks and overrides
(`cognica_sglang.config_checks`), the per-request checks (`cognica_sglang.request_checks`) and the LoRA name hooks
(`cognica_sglang.lora`).
`SGLANG_EXTERNAL_MODEL_PACKAGE=cognica_sglang` also works: SGLang then imports
`cognica_sglang.model` and reads its `EntryClass`.
"""

from __future__ import annotations

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

    from cognica_sglang.config_checks import attention_overrides, check_server_args
    from cognica_sglang.model import EntryClass
    from cognica_sglang.request_checks import refuse_requests_that_crash_the_scheduler

    for cls in EntryClass:
        ModelRegistry.models.setdefault(cls.__name__, cls)
        if cls.__name__ not in _registered:
            for fn in (attention_overrides, check_server_args):
                register_model_override(cls.__name__)(fn)
            _registered.add(cls.__name__)
    from cognica_sglang.lora import LORA_HOOKS

    hooks = [("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
              refuse_requests_that_crash_the_scheduler, "BEFORE"), *LORA_HOOKS]
    for target, hook, kind in hooks:
        if target not in _registered:
            HookRegistry.register(target, hook, HookType[kind])
            _registered.add(target)
