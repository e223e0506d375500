"""vLLM plugin for Cognica-BP/PoE-v1.0-1.3B-base: `register()` is the `vllm.general_plugins` entry point."""

from __future__ import annotations

from cognica.config import ARCHITECTURE_ALIASES


def register() -> None:
    """Register the config (transformers AutoConfig) and every architecture spelling, lazily, so loading the
    plugin never imports the model (or starts CUDA) in a forked worker; and the first-process config checks
    (`cognica_vllm.config_checks`) in vLLM's `MODELS_CONFIG_MAP`, the table `VllmConfig.try_verify_and_update_config`
    reads by architecture. Logs one warning outside the tested vLLM versions (`config_checks.untested_vllm`).
    Re-entrant."""
    import vllm
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from cognica.hf import register as register_hf
    from cognica_vllm.config_checks import CognicaConfigChecks, untested_vllm
    from cognica_vllm.self_spec import register as register_self_spec

    warning = untested_vllm(vllm.__version__)
    if warning:
        init_logger(f"vllm.{__name__}").warning_once(warning)
    register_hf()
    register_self_spec()  # the 'cognica_self' speculative method, vLLM >= 0.34 (cognica_vllm.self_spec)
    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURE_ALIASES:
        MODELS_CONFIG_MAP.setdefault(arch, CognicaConfigChecks)
        if arch not in supported:
            ModelRegistry.register_model(arch, "cognica_vllm.model:CognicaPoEForCausalLM")
