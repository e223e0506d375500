"""Pre-quantized compressed-tensors W8A8 int8 checkpoints on SGLang 0.5.23 (CPU, with the sgl_kernel stand-in): not
servable.

The control is SGLang's in-tree LlamaForCausalLM, written with transformers and quantized as tests/vllm/test_quant.py
quantizes its control (every *_proj int8 per output channel with a bf16 `weight_scale`, dynamic per-token int8
inputs, lm_head ignored): on a CPU it fails while building its first quantized layer, because SGLang's
compressed-tensors scheme checks the CUDA compute capability (cognica_sglang/quant.py has the whole reason). Our
plugin therefore refuses a quantized checkpoint on a CPU at start, with one line quoting that reason. When a future
SGLang serves the control, the first test fails: then serve W8A8 on SGLang, against the reference on the
dequantized weights, instead of refusing it.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" .venv/sglang/bin/python -m pytest \
        tests/sglang/test_quant.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)
import torch
from safetensors.torch import load_file, save_file

from cognica.checkpoint import open_checkpoint  # noqa: E402
from cognica.factory import make_checkpoint  # noqa: E402
from cognica.names import canonical_name  # noqa: E402
from cognica_sglang.quant import ENGINE_REASON, check_quantization  # noqa: E402
from tests.adapters import W8A8_CONFIG, quantize_per_channel, write_llama_w8a8  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
# llm-compressor's W8A8 int8 scheme, as tests/vllm/test_quant.py writes it
QUANTIZED = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
# the first line of our refusal
REFUSAL = "cognica: this checkpoint is quantized (compressed-tensors), which SGLang cannot serve on a CPU"
# how SGLang 0.5.23 fails on the control, in bf16 (the dtype it takes compressed-tensors in)
ENGINE_FAILURE = ("_check_scheme_supported", "Found no NVIDIA driver on your system")


def write_cognica_w8a8(src: Path, out: Path) -> Path:
    shutil.copytree(src, out)
    quant = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        module = canonical_name(name).removesuffix(".weight")
        if module.startswith("transformer.h.") and module.endswith(QUANTIZED):
            quant[name], quant[f"{name.removesuffix('.weight')}.weight_scale"] = quantize_per_channel(t)
        else:
            quant[name] = t
    save_file(quant, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "quantization_config": W8A8_CONFIG}))
    open_checkpoint(out)  # precondition: a checkpoint cognica inspect accepts, so only the engine can refuse it
    return out


def start_engine(model: Path, env: dict[str, str]) -> str:
    """Start sglang.Engine on `model` (bf16, CPU) in a subprocess (a scheduler that fails SIGQUITs its parent) and
    greedy-decode 4 tokens; return its whole output: "STARTED" when that worked, else the failure."""
    code = (
        "import sys, sglang\n"
        f"e = sglang.Engine(model_path={str(model)!r}, device='cpu', attention_backend='torch_native', "
        "dtype='bfloat16', skip_tokenizer_init=True, disable_cuda_graph=True, skip_server_warmup=True, "
        "max_total_tokens=4096, log_level='info')\n"
        "e.generate(input_ids=[[1, 2, 3, 4]], sampling_params={'max_new_tokens': 4, 'temperature': 0})\n"
        "print('STARTED', flush=True)\n"
        "e.shutdown()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, **env}, start_new_session=True)
    return proc.stdout + proc.stderr


def test_in_tree_llama_cannot_serve_w8a8_on_cpu(tmp_path):
    llama = tmp_path / "llama"
    write_llama_w8a8(llama)
    # SGLang's own Llama class, without importing its ~250 other model modules
    (tmp_path / "llama_only").mkdir()
    (tmp_path / "llama_only" / "__init__.py").write_text("")
    (tmp_path / "llama_only" / "llama.py").write_text(
        "from sglang.srt.models.llama import LlamaForCausalLM\nEntryClass = LlamaForCausalLM\n")
    out = start_engine(llama, {"SGLANG_EXTERNAL_MODEL_PACKAGE": "llama_only",
                               "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])})
    assert "STARTED" not in out, "SGLang's in-tree Llama now serves a W8A8 int8 checkpoint on a CPU: serve ours " \
        "too (test it against the reference on the dequantized weights) instead of refusing it"
    for marker in ENGINE_FAILURE:
        assert marker in out, f"the in-tree Llama fails on W8A8 otherwise than cognica_sglang.quant.ENGINE_REASON " \
            f"says (no {marker!r}); update the reason:\n{out[-3000:]}"


def test_check_quantization_refuses_on_cpu_with_one_line_quoting_the_engine():
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

    hf_config = SimpleNamespace(quantization_config=W8A8_CONFIG)
    engine_config = CompressedTensorsConfig.from_config(W8A8_CONFIG)  # what SGLang hands the model
    auto = [None] if not torch.cuda.is_available() else []  # --device unset: a CPU here
    for quant_config, device in [(None, "cpu"), (engine_config, "cpu"), *((None, d) for d in auto)]:
        with pytest.raises(ValueError) as e:
            check_quantization(quant_config, hf_config, device)
        msg = str(e.value)
        assert msg.startswith(REFUSAL) and "\n" not in msg, f"not the one-line refusal: {msg!r}"
        assert ENGINE_REASON in msg and ENGINE_FAILURE[1] in msg, f"the refusal should quote SGLang's reason: {msg!r}"


def test_check_quantization_passes_float_checkpoints_and_cuda():
    check_quantization(None, SimpleNamespace(), "cpu")  # no quantization_config: a float checkpoint
    check_quantization(None, SimpleNamespace(quantization_config=None), "cpu")
    check_quantization(None, SimpleNamespace(quantization_config=W8A8_CONFIG), "cuda")


def test_quantized_checkpoint_is_refused_at_engine_start_with_that_line(tmp_path):
    src = make_checkpoint(tmp_path / "tiny", preset="tiny", seed=0, tokenizer=False, progress=False)
    out = start_engine(write_cognica_w8a8(src, tmp_path / "w8a8"), {"SGLANG_EXTERNAL_MODEL_PACKAGE": "cognica_sglang"})
    assert "STARTED" not in out, "SGLang started on a W8A8 checkpoint on a CPU"
    assert REFUSAL in out, f"the engine start does not fail with our one-line refusal:\n{out[-3000:]}"
    assert ENGINE_FAILURE[0] not in out, "SGLang's CUDA capability check ran before our refusal"
    assert "KV Cache is allocated" not in out, "a KV cache was allocated before the refusal"
