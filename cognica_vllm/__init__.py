"""vLLM plugin for Cognica-BP/PoE-v1.0-1.3B-base: `register()` is the `vllm.general_plugins` entry point."""

from __future__ import annotations

from cognica.config import ARCHITECTURE_ALIASES


def register() -> None:
    """Register the config (transformers AutoConfig) and every architecture spelling, lazily, so loading the
    plugin never imports the model (or starts CUDA) in a forked worker. Re-entrant."""
    from vllm import ModelRegistry

    from cognica.hf import register as register_hf

    register_hf()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURE_ALIASES:
        if arch not in supported:
            ModelRegistry.register_model(arch, "cognica_vllm.model:CognicaPoEForCausalLM")
