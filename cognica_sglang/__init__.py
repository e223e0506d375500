"""SGLang plugin for Cognica (nanochat GPT): `register()` is the `sglang.srt.plugins` entry point.

SGLang calls it in every process (engine, scheduler, detokenizer, data-parallel controller)
before it parses server arguments. It registers the config and the tokenizer class with
transformers (no `trust_remote_code`), the model under every architecture string in
`cognica.config.ARCHITECTURE_ALIASES`, and one config-time override: on CPU or with the
`torch_native` backend the hybrid sliding-window KV pool is turned off, because that backend reads
sliding layers' keys with untranslated full-pool slots (windows still apply; only the memory
saving is lost). CUDA backends (triton, flashinfer, fa3) keep the small sliding-window pool.
`SGLANG_EXTERNAL_MODEL_PACKAGE=cognica_sglang` also works: SGLang then imports
`cognica_sglang.model` and reads its `EntryClass`.
"""

from __future__ import annotations

from typing import Any


def _hybrid_swa_override(server_args: Any, hf_config: Any) -> dict:
    from sglang.srt.arg_groups.model_override_base import attention_backends_of, resolving_view

    cfg = resolving_view(server_args)
    if cfg.device == "cpu" or "torch_native" in attention_backends_of(cfg):
        return {"disable_hybrid_swa_memory": True}
    if cfg.device is None:
        import torch

        if not torch.cuda.is_available():
            return {"disable_hybrid_swa_memory": True}
    return {}


def register() -> None:
    """Register the config, the model classes and the CPU override with SGLang (idempotent)."""
    from cognica.hf import register as register_config

    register_config()  # config, reference model and the BOS-once tokenizer class: no remote code
    from sglang.srt.arg_groups.model_override_base import _MODEL_OVERRIDE_FNS, register_model_override
    from sglang.srt.models.registry import ModelRegistry

    from cognica_sglang.model import EntryClass

    for cls in EntryClass:
        ModelRegistry.models.setdefault(cls.__name__, cls)
        if _hybrid_swa_override not in _MODEL_OVERRIDE_FNS.get(cls.__name__, ()):
            register_model_override(cls.__name__)(_hybrid_swa_override)
