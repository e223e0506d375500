"""The PoE twin on vLLM 0.34's V2 runner (.venv/vllm-v2, Triton interpreted; see tests/vllm_v2/test_parity.py):
a stage-1 prefix, the Log-OP head, and self-speculative decoding with the hybrid KV-cache manager left on.

Checkpoint: the tiny preset with 8 layers in stages of 2 (tests/vllm/test_poe.py describes it), float32, eager, 64-token
chunked prefill, prompts past the 256-key S window. Self-speculation (`draft_model`, 2 draft tokens, the stage-1
prefix drafting) runs with one KV-cache group per layer pattern: vLLM's V2 runner builds the drafter's metadata per
group, so the plugin leaves the hybrid manager on there (`cognica_vllm.config_checks.needs_one_kv_cache_group`), and
these tests are what decided it: greedy tokens and log-probs equal the full reference across rejected drafts.
One engine at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cognica.model import load_reference
from tests.utils import assert_fp32_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import EngineSlot, make_poe_checkpoint, run  # noqa: E402
from tests.vllm_v2_utils import close, kv_cache_groups  # noqa: E402

CHUNK = 64
NEW = 8
PROMPTS = random_prompts([300, 9], seed=11)  # the 300-token one past the S window


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_poe_checkpoint(tmp_path_factory.mktemp("poe") / "poe")


@pytest.fixture(scope="module")
def full_ref(ckpt: Path):
    return load_reference(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def engines(ckpt: Path):
    slot = EngineSlot(ckpt, close, max_num_batched_tokens=CHUNK, max_num_seqs=8, enforce_eager=True)
    yield slot
    slot.close()


@pytest.mark.parametrize("mode", [{"poe_exit_stage": 1}, {"poe_exit_stage": 3, "poe_head": "logop"}],
                         ids=["stage1-prefix", "stage3-logop"])
def test_stage_mode_matches_the_reference_stage_mode(engines, ckpt, full_ref, mode):
    """`--hf-overrides`: the stage-1 prefix (layers 0-1, no backout) and the Log-OP head over stages 1-3."""
    llm = engines.get(str(mode), hf_overrides=mode)
    ref = load_reference(ckpt, dtype=torch.float32, **mode)
    outs = run(llm, PROMPTS, NEW)
    for prompt, (tokens, logprobs, _) in zip(PROMPTS, outs, strict=True):
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"V2, {mode}, {len(prompt)}-token prompt", n_new=NEW)
    assert full_ref.generate([PROMPTS[0]], NEW)[0] != outs[0][0], \
        f"{mode}: the full model predicts the same tokens, so this test could not tell the modes apart"


SPEC = {"method": "draft_model", "num_speculative_tokens": 2}


def spec_counts(llm: LLM) -> tuple[int, int]:
    """(draft tokens proposed, draft tokens accepted) so far."""
    values = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num_")
              and hasattr(m, "value")}
    return int(values["vllm:spec_decode_num_draft_tokens"]), int(values["vllm:spec_decode_num_accepted_tokens"])


def test_self_speculation_with_the_hybrid_manager_on_equals_the_reference(engines, ckpt, full_ref):
    """vLLM's own flags only: the plugin leaves the hybrid KV-cache manager on under V2 (S and L layers in separate
    KV-cache groups, the drafter's layers among them). Three requests, one past the window, batched, decode with drafts
    both accepted and rejected (random weights: the stage-1 drafter often disagrees), so the target's and the
    drafter's smear state are rewritten after rejections."""
    llm = engines.get("spec", speculative_config={**SPEC, "model": str(ckpt)}, disable_log_stats=False)
    assert llm.llm_engine.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager is False, \
        "under V2 the plugin should leave the hybrid KV-cache manager on for self-speculation"
    groups = kv_cache_groups(llm)
    assert len(groups) > 1, f"expected one KV-cache group per layer pattern, got {groups}"
    assert any(name.startswith("draft_model.") for g in groups for name in g), \
        f"the drafter's layers should have KV-cache groups too: {groups}"
    prompts = random_prompts([1, 33, 300], seed=4)
    for prompt, (tokens, logprobs, _) in zip(prompts, run(llm, prompts, 12), strict=True):
        assert_fp32_parity(full_ref, prompt, tokens, logprobs, f"V2 speculative, {len(prompt)}-token prompt", n_new=12)
    drafted, accepted = spec_counts(llm)
    assert 0 < accepted < drafted, f"expected both accepted and rejected drafts, got {accepted}/{drafted}"
