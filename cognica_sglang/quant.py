"""Pre-quantized checkpoints on SGLang: refused at start on a CPU, where SGLang 0.5.23 cannot run them.

SGLang's compressed-tensors W8A8 schemes are CUDA-only (sglang/srt/layers/quantization/compressed_tensors/):
`CompressedTensorsConfig.get_linear_scheme` checks the CUDA compute capability of every quantized layer as it is
built (`_check_scheme_supported` -> `torch.cuda.get_device_capability`; int8 needs >= 80, fp8 >= 89), and
`CompressedTensorsW8A8Int8.apply_weights` quantizes activations with a Triton kernel (`per_token_quant_int8`) and
multiplies with `sgl_kernel.int8_scaled_mm`, imported only when CUDA is present. On a CPU SGLang's own
LlamaForCausalLM fails on the same W8A8 int8 checkpoint layout vLLM serves (tests/sglang/test_quant.py keeps that
control); left alone ours would fail the same way, in the scheduler, with a CUDA driver error that names neither
the checkpoint nor the fix.
"""

from __future__ import annotations

from typing import Any

# what SGLang 0.5.23 answers on a CPU (tests/sglang/test_quant.py asserts its in-tree Llama still fails this way)
ENGINE_REASON = ("SGLang 0.5.23's compressed-tensors layers are CUDA-only: building one checks the CUDA compute "
                 "capability ('RuntimeError: Found no NVIDIA driver on your system' on a CPU, for its own "
                 "LlamaForCausalLM too) and its GEMM is sgl_kernel.int8_scaled_mm; in float32 it also refuses "
                 "('torch.float32 is not supported for quantization method compressed-tensors')")


def quant_method(quant_config: Any) -> str:
    """The method name of SGLang's QuantizationConfig, or of config.json's quantization_config dict."""
    if hasattr(quant_config, "get_name"):
        return str(quant_config.get_name())
    return str(quant_config.get("quant_method") if isinstance(quant_config, dict) else quant_config)


def check_quantization(quant_config: Any, hf_config: Any, device: str | None = None) -> None:
    """Raise a one-line ValueError quoting SGLang's reason for a quantized checkpoint served on a CPU.

    `quant_config` is what SGLang hands the model (its QuantizationConfig) or None, in which case config.json's
    `quantization_config` on `hf_config` is read; `device` is `--device` (None: auto, a CPU without CUDA). CUDA
    and other devices pass."""
    qc = quant_config if quant_config is not None else getattr(hf_config, "quantization_config", None)
    if qc is None:
        return
    from cognica_sglang.config_checks import serves_on_cpu

    if not serves_on_cpu(device):
        return
    named = getattr(hf_config, "quantization_config", None) or qc  # config.json's spelling, "compressed-tensors"
    raise ValueError(f"cognica: this checkpoint is quantized ({quant_method(named)}), which SGLang cannot serve on a "
                     f"CPU: {ENGINE_REASON}. Serve it with vLLM (W8A8 int8 tested on CPU), or serve the float "
                     "checkpoint on SGLang")
