"""vLLM plugin for Cognica-BP/PoE-v1.0-1.3B-base: `register()` is the `vllm.general_plugins` entry point."""

from __future__ import annotations

from cognica.config import ARCHITECTURE_ALIASES


def register() -> None:
    """Register the config (transformers AutoConfig) and every architecture spelling, lazily, so loading the
    plugin never imports the model (or starts CUDA) in a forked worker; and the first-process config checks
    (`cognica_vllm.config_checks`) in vLLM's `MODELS_CONFIG_MAP`, the table `VllmConfig.try_verify_and_update_config`
    reads by architecture. Re-entrant."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from cognica.hf import register as register_hf
    from cognica_vllm.config_checks import CognicaConfigChecks

    register_hf()
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURE_ALIASES:
        MODELS_CONFIG_MAP.setdefault(arch, CognicaConfigChecks)
        if arch not in supported:
            ModelRegistry.register_model(arch, "cognica_vllm.model:CognicaPoEForCausalLM")
