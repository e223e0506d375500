"""PoE twin on vLLM against the reference's stage modes (`cognica.model.load_reference(..., poe_exit_stage=...)`):
stage prefixes, the Log-OP head, the BP refusal, and self-speculative decoding with the stage-1 prefix drafting.

Checkpoint: the tiny preset with 8 layers in stages of 2 (stage ends 1, 3, 5, 7; backout stored after layer 4), the
release's shape in miniature: stage 1 is two S layers (smear then reads a sliding layer's slots) and exits before
the backout block; the Log-OP head over stages 1-3 mixes exits without and with the backout. Float32: greedy tokens
identical and per-token logprobs within 1e-3 of the reference, prompts past the 256-key S window, prefilled in
64-token chunks, batched. One engine at a time (2 cores); stage 1 runs vLLM's default compiled path, the others eager.

    .venv/vllm/bin/python -m pytest tests/vllm/test_poe.py
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from cognica.factory import make_checkpoint
from cognica.model import load_reference
from tests.utils import assert_fp32_parity, random_prompts

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM  # noqa: E402  (after the env defaults above)

from tests.vllm_utils import EngineSlot, check_prefix_cache_hit_then_decode, make_poe_checkpoint  # noqa: E402
from tests.vllm_utils import run as run_n  # noqa: E402

CHUNK = 64
NEW = 24
LONG, SHORT, CROSS = random_prompts([420, 9, 240], seed=11)  # CROSS decodes across the 256-key window
MIXED = [1, 3, 17, 31, 32, 33, 64, 65, 100, 200, 255, 256, 257, 300, 511, 700]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_poe_checkpoint(tmp_path_factory.mktemp("poe") / "poe")


@pytest.fixture(scope="module")
def bp_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("bp") / "bp", preset="tiny", seed=5, tokenizer=False,
                           progress=False, n_layer=8, poe_every=2)


@pytest.fixture(scope="module")
def engines(ckpt: Path):
    slot = EngineSlot(ckpt, max_num_batched_tokens=CHUNK, max_num_seqs=16)
    yield slot
    slot.close()


def run(llm: LLM, prompts: list[list[int]], n: int = NEW) -> list[tuple[list[int], list[float], Any]]:
    return run_n(llm, prompts, n)


def check_mode(llm: LLM, ref, full_ref, what: str) -> None:
    outs = run(llm, [LONG, SHORT, CROSS], n=40)
    for prompt, (tokens, logprobs, _) in zip([LONG, SHORT, CROSS], outs):
        assert_fp32_parity(ref, prompt, tokens, logprobs, f"{what}: {len(prompt)}-token prompt", n_new=40)
    assert full_ref.generate([LONG], 40)[0] != outs[0][0], \
        f"{what}: the full model predicts the same tokens, so this test could not tell the modes apart"


@pytest.fixture(scope="module")
def full_ref(ckpt: Path):
    return load_reference(ckpt, dtype=torch.float32)


def test_stage1_prefix_matches_reference_stage1(engines, ckpt, full_ref):
    """`--hf-overrides '{"poe_exit_stage": 1}'`: layers 0-1 only, no backout, compiled (vLLM's default)."""
    llm = engines.get("stage1", hf_overrides={"poe_exit_stage": 1})
    layer_names = llm.apply_model(lambda m: sorted({n.split(".")[2] for n, _ in m.named_parameters()
                                                    if n.startswith("model.layers.")}))
    assert layer_names == [["0", "1"]], f"stage 1 should build layers 0-1 only, built {layer_names}"
    ve = llm.apply_model(lambda m: sorted(m.model.value_embeds.keys()))
    assert ve == [["1"]], f"stage 1 should hold only layer 1's value-embedding table, got {ve}"
    check_mode(llm, load_reference(ckpt, dtype=torch.float32, poe_exit_stage=1), full_ref, "stage 1")


def test_stage3_logop_head_matches_reference(engines, ckpt, full_ref):
    """`{"poe_exit_stage": 3, "poe_head": "logop"}`: layers 0-5; the mean of the log-softmaxes at the stage ends 1
    and 3 (no backout) and 5 (after the backout block: x - backout_lambda * x_backout, stored after layer 4),
    returned as normalised log-probs that vLLM must not soft-cap again."""
    mode = {"poe_exit_stage": 3, "poe_head": "logop"}
    llm = engines.get("stage3-logop", hf_overrides=mode, enforce_eager=True)
    check_mode(llm, load_reference(ckpt, dtype=torch.float32, **mode), full_ref, "stage 3, Log-OP")


SPEC = {"method": "draft_model", "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def spec_llm(engines, ckpt):
    # the drafter is the stage-1 prefix of the same files; vLLM's own flags only: the plugin turns the hybrid
    # KV-cache manager off itself (cognica_vllm.config_checks)
    return engines.get("spec", speculative_config={**SPEC, "model": str(ckpt)}, enforce_eager=True,
                       disable_log_stats=False)


def spec_counts(llm: LLM) -> tuple[int, int]:
    """(draft tokens proposed, draft tokens accepted) so far."""
    values = {m.name: m.value for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num_")
              and hasattr(m, "value")}
    return int(values["vllm:spec_decode_num_draft_tokens"]), int(values["vllm:spec_decode_num_accepted_tokens"])


def test_self_speculative_greedy_equals_reference_across_16_mixed_requests(spec_llm, full_ref):
    """Batched, past the window, with rejected drafts rolled back: the random weights make the stage-1 drafter
    disagree with the full model often, so the target's smear state is rewritten after rejections many times."""
    drafted0, accepted0 = spec_counts(spec_llm)
    prompts = random_prompts(MIXED, seed=4)
    for prompt, (tokens, logprobs, _) in zip(prompts, run(spec_llm, prompts)):
        assert_fp32_parity(full_ref, prompt, tokens, logprobs, f"speculative, {len(prompt)}-token prompt", n_new=NEW)
    drafted, accepted = spec_counts(spec_llm)
    drafted, accepted = drafted - drafted0, accepted - accepted0
    assert 0 < accepted < drafted, f"expected both accepted and rejected drafts, got {accepted}/{drafted}"


def test_self_speculative_after_a_prefix_cache_hit_equals_reference(spec_llm, full_ref):
    check_prefix_cache_hit_then_decode(spec_llm, full_ref, "speculative after a prefix-cache hit")


@pytest.fixture(scope="module")
def shallow_ckpt(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same weights with every layer past stage 1 an identity (c_proj zero, resid 1, x0 0): the full model then
    predicts exactly like its stage-1 prefix (the final backout scales x, which the norm undoes)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from cognica.config import tensor_layer

    out = tmp_path_factory.mktemp("shallow") / "shallow"
    shutil.copytree(ckpt, out)
    w = load_file(str(ckpt / "model.safetensors"))
    for name, t in w.items():
        layer = tensor_layer(name)
        if layer is not None and layer >= 2 and name.endswith("c_proj.weight"):
            w[name] = torch.zeros_like(t)
    w["resid_lambdas"][2:], w["x0_lambdas"][2:] = 1.0, 0.0
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_drafter_is_the_exact_stage1_prefix(engines, shallow_ckpt):
    """Where the full model predicts like its stage-1 prefix, every draft is accepted: a drafter that differs from
    the prefix anywhere (windows, smear, value embeddings, positions past the window) would have drafts rejected."""
    llm = engines.get("spec-shallow", model=str(shallow_ckpt), enforce_eager=True, disable_log_stats=False,
                      speculative_config={**SPEC, "model": str(shallow_ckpt)})
    ref = load_reference(shallow_ckpt, dtype=torch.float32, poe_exit_stage=1)
    prompts = random_prompts([5, 300, 700], seed=9)
    for prompt, (tokens, _, _) in zip(prompts, run(llm, prompts)):
        assert ref.generate([prompt], NEW)[0] == tokens, f"{len(prompt)}-token prompt: not the stage-1 prediction"
    drafted, accepted = spec_counts(llm)
    assert drafted > 0 and accepted >= 0.98 * drafted, \
        f"the drafter disagreed with its own prefix: {accepted}/{drafted} drafts accepted"


def test_self_speculative_with_the_hybrid_manager_forced_on_is_refused_in_the_first_process(ckpt):
    """vLLM 0.32 hands a draft model KV-cache group 0's metadata (`GPUModelRunner._build_attention_metadata`): with the
    hybrid manager the drafter would write over the target's sliding-layer KV, so forcing it on is refused. With the
    engine core in its own process (vLLM's default), the user's exception must be that line, not vLLM's "Engine core
    initialization failed. See root cause above"."""
    import subprocess
    import sys

    script = (f"from vllm import LLM\nif __name__ == '__main__':\n    LLM(model={str(ckpt)!r}, max_model_len=1024, "
              f"block_size=32, dtype='float32', skip_tokenizer_init=True, enforce_eager=True, "
              f"gpu_memory_utilization=0.3, speculative_config={ {**SPEC, 'model': str(ckpt)}!r}, "
              f"disable_hybrid_kv_cache_manager=False)\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    # the raised exception: the lines after the traceback's last frame (vLLM's config errors come wrapped in
    # pydantic's one-error ValidationError, as every VllmConfig.__post_init__ ValueError does)
    lines = out.stderr.splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  File ")]
    raised = "\n".join(lines[frames[-1] + 2:] if frames else lines[-3:])
    assert out.returncode != 0 and "self-speculative decoding of Cognica needs disable_hybrid_kv_cache_manager" \
        in raised, f"the user-facing exception must carry the reason, got: {raised}"


def test_bp_checkpoint_refuses_a_stage_exit(engines, bp_ckpt):
    """The BP card: its intermediate layers are not valid predictors; one message names the override."""
    engines.close()
    with pytest.raises(Exception, match="poe_mode='none'.*poe_force=true"):
        LLM(model=str(bp_ckpt), max_model_len=1024, block_size=32, dtype="float32", skip_tokenizer_init=True,
            enforce_eager=True, gpu_memory_utilization=0.3, hf_overrides={"poe_exit_stage": 1})
