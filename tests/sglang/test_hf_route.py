"""The Hugging Face route to SGLang (issue 28 item 4, run in .venv/sglang): the full fine-tune and a PEFT
`all-linear` adapter of tests/hf_route.py, saved with `save_pretrained`, served by one float32 SGLang engine
(torch_native LoRA backend): the base requests equal the trained model, the adapter PEFT's `merge_and_unload`
(greedy identical, generated and prompt log-probs within 1e-3).

SGLang 0.5.23's LoRA layers pin host memory, which fails without a CUDA driver, so the engine runs with pinning
stubbed exactly as tests/sglang/test_lora.py does (its `no_pin` fixture); pinning changes no value. llm-compressor's
W8A8 is not served here: SGLang refuses compressed-tensors on a CPU (tests/sglang/test_quant.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)

from tests.hf_route import RANK, fine_tune_and_adapt, max_logit_change  # noqa: E402
from tests.sglang.test_lora import no_pin  # noqa: E402, F401  (the fixture)
from tests.sglang_utils import EngineSlot, check_parity, random_prompt  # noqa: E402

NEW = 16


@pytest.fixture(scope="module")
def route(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return fine_tune_and_adapt(tiny_ckpt, tmp_path_factory.mktemp("hf_route"), {"all_linear": "all-linear"})


@pytest.fixture(scope="module")
def engine(route: dict, request: pytest.FixtureRequest):
    request.getfixturevalue("no_pin")
    slot = EngineSlot(route["sft"][0], max_total_tokens=4096, dtype="float32", enable_lora=True,
                      lora_backend="torch_native", lora_paths=[f"all_linear={route['all_linear'][0]}"],
                      max_loras_per_batch=2, max_lora_rank=RANK)
    yield slot.get("hf_route")
    slot.close()


def serve_one(engine, prompt: list[int], lora: str | None) -> dict:
    [out] = engine.generate(input_ids=[prompt], sampling_params={"max_new_tokens": NEW, "temperature": 0.0,
                                                                 "ignore_eos": True},
                            return_logprob=True, logprob_start_len=0, lora_path=[lora])
    return out


def test_full_fine_tune_saved_by_save_pretrained_serves_as_trained(engine, route):
    _, trained = route["sft"]
    prompt = random_prompt(300, seed=51)
    moved = max_logit_change(trained, route["base"], prompt)
    assert moved > 0.05, f"the fine-tune barely moved the logits ({moved:.3g}): the test would not see a stale load"
    check_parity(trained, prompt, serve_one(engine, prompt, None), NEW, "full fine-tune served by SGLang")


def test_peft_adapter_serves_as_the_merged_reference(engine, route):
    _, merged = route["all_linear"]
    prompt = random_prompt(300, seed=52)
    moved = max_logit_change(merged, route["sft"][1], prompt)
    assert moved > 0.05, f"the adapter barely moved the logits ({moved:.3g})"
    check_parity(merged, prompt, serve_one(engine, prompt, "all_linear"), NEW, "PEFT all-linear adapter on SGLang")
