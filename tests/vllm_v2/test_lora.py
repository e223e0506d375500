"""LoRA on vLLM 0.34's V2 runner (.venv/vllm-v2, Triton interpreted; see tests/vllm_v2/test_parity.py) against the
reference with PEFT-merged weights (tests/adapters.py), float32.

The CPU platform runs LoRA through `PunicaWrapperCPU` (torch ops; `CpuPlatform.get_punica_wrapper`) and eager
(`CpuPlatform.check_and_update_config` turns compilation off with LoRA), so this covers the V2 runner's LoRA wiring
with our model (adapter slots, `CognicaLoRA`'s module names, value embeddings and smear under adapters), not the CUDA
punica Triton kernels. Two adapters batched in one step, 64-token chunks, one prompt past the 256-key S window.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from tests.adapters import write_adapter_set
from tests.utils import assert_fp32_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm.lora.request import LoRARequest  # noqa: E402

from tests.vllm_utils import answer, greedy, tiny_llm  # noqa: E402
from tests.vllm_v2_utils import close  # noqa: E402

RANK = 8
NEW = 8


@pytest.fixture(scope="module")
def adapters(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    ref = load_reference(tiny_ckpt, dtype=torch.float32)
    written = write_adapter_set(tmp_path_factory.mktemp("adapters"), ref, RANK)
    return {name: (LoRARequest(name, i, path), merged) for i, (name, (path, merged)) in enumerate(written.items(),
                                                                                                   start=1)}


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    # max_loras one above the adapters a batch uses (tests/vllm/test_lora.py: the CPU punica ops read a base token's
    # slot -1 as the last slot); no base request is batched with adapter requests here
    engine = tiny_llm(tiny_ckpt, max_num_seqs=4, enable_lora=True, max_loras=3, max_cpu_loras=4, max_lora_rank=RANK)
    yield engine
    close(engine)
    del engine
    gc.collect()


def test_two_adapters_in_one_batch_each_match_their_merged_reference(llm, adapters):
    (all_req, all_ref), (vocab_req, vocab_ref) = adapters["all"], adapters["vocab"]
    prompts = random_prompts([300, 9], seed=24)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(NEW), lora_request=[all_req, vocab_req],
                        use_tqdm=False)
    for prompt, ref, name, out in zip(prompts, [all_ref, vocab_ref], ["every projection", "wte and lm_head"], outs,
                                      strict=True):
        tokens, logprobs = answer(out)
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"V2, adapter on {name}, {len(prompt)}-token prompt",
                           n_new=NEW)
