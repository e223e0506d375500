"""PoE stage modes on SGLang against the reference's (`cognica.model.load_reference(..., poe_exit_stage=...)`).

Checkpoint: the tiny preset with 8 layers in stages of 2 (stage ends 1, 3, 5, 7; backout after layer 4), so stage 1
exits before the backout block and the Log-OP head over stages 1..3 mixes exits without and with it. Float32:
greedy tokens identical and per-token logprobs within 1e-3 (tests/sglang_utils.check_parity), on prompts past the
256-key S window, prefilled in 64-token chunks, batched with a short one.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python -m pytest tests/sglang/test_poe.py
"""

from __future__ import annotations

import json

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)
import torch

from cognica.factory import make_checkpoint  # noqa: E402
from cognica.model import load_reference  # noqa: E402
from tests.sglang_utils import EngineSlot, check_parity, engine_start_refusal, random_prompt, run  # noqa: E402

CHUNK = 64
MODES = {
    "stage1": {"poe_exit_stage": 1},
    "stage3-logop": {"poe_exit_stage": 3, "poe_head": "logop"},
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("poe"), preset="tiny", seed=5, tokenizer=False, progress=False,
                           n_layer=8, poe_mode="flat", poe_every=2)


@pytest.fixture(scope="module")
def engines(ckpt):
    slot = EngineSlot(ckpt, max_total_tokens=8192, chunked_prefill_size=CHUNK, dtype="float32")
    yield slot
    slot.close()


def test_stage_override_reaches_sglang_config_and_sizes_the_kv_pool(ckpt):
    """`--json-model-override-args` is applied to the HF config after loading (`get_config` in
    sglang/srt/utils/hf_transformers/config.py); the KV pool has num_hidden_layers layers (`_compute_model_num_layers`
    in sglang/srt/model_executor/model_runner_components/layer_setup.py)."""
    from sglang.srt.utils.hf_transformers.config import get_config

    import cognica_sglang

    cognica_sglang.register()
    hf_config = get_config(str(ckpt), trust_remote_code=False, model_override_args={"poe_exit_stage": 1})
    assert hf_config.num_hidden_layers == 2, f"stage 1 should give 2 KV layers, got {hf_config.num_hidden_layers}"
    assert get_config(str(ckpt), trust_remote_code=False).num_hidden_layers == 8


LONG, SHORT, NEW = random_prompt(420, seed=1), random_prompt(9, seed=2), 16


@pytest.fixture(scope="module")
def full_model_tokens(ckpt) -> list[int]:
    return load_reference(ckpt, dtype=torch.float32).generate([LONG], NEW)[0]


@pytest.mark.parametrize("mode", list(MODES))
def test_stage_mode_matches_reference(engines, ckpt, full_model_tokens, mode):
    engine = engines.get(mode, json_model_override_args=json.dumps(MODES[mode]))
    ref = load_reference(ckpt, dtype=torch.float32, **MODES[mode])
    long_out, short_out = run(engine, [LONG, SHORT], NEW)
    check_parity(ref, LONG, long_out, NEW, f"{mode}: {len(LONG)}-token prompt (chunks of {CHUNK}, past the window)")
    check_parity(ref, SHORT, short_out, NEW, f"{mode}: short prompt batched with it")
    assert full_model_tokens != long_out["output_ids"], \
        f"{mode}: the full model predicts the same tokens, so this test could not tell the modes apart"


def test_bp_checkpoint_refuses_a_stage_exit_in_the_first_process(tmp_path):
    bp = make_checkpoint(tmp_path / "bp", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                         poe_every=2)
    rc, out, err = engine_start_refusal(bp, "json_model_override_args='{\"poe_exit_stage\": 1}'")
    assert rc == 0, f"SGLang started a stage exit on a BP checkpoint:\n{err[-2000:]}"
    assert "STARTED 0 REFUSED" in out, f"refused only after engine processes started:\n{out[-2000:]}"
    assert "not trained as predictors; set poe_force=true" in out, \
        f"the refusal should say why and how to override:\n{out[-2000:]}\n{err[-2000:]}"


def test_bpb_passes_the_stage_options_as_json_model_override_args(monkeypatch):
    """`cognica bpb --engine sglang --poe-exit-stage 1` starts SGLang with the option (the scoring path itself is
    tests/sglang/test_parity.py's bpb parity)."""
    import cognica_sglang.bpb

    started = {}

    class Engine:
        def __init__(self, **kwargs):
            started.update(kwargs)

        def generate(self, **kwargs):
            return [{"meta_info": {"input_token_logprobs": [(None, 1, None), (-1.5, 2, None)]}}]

        def shutdown(self):
            started["shutdown"] = True

    monkeypatch.setattr(sglang, "Engine", Engine)
    got = cognica_sglang.bpb.prompt_logprobs("/ckpt", [[1, 2]], overrides={"poe_exit_stage": 1})
    assert got == [[-1.5]] and started.get("shutdown"), f"unexpected scoring through the fake engine: {got}"
    assert json.loads(started["json_model_override_args"]) == {"poe_exit_stage": 1}, f"options not passed: {started}"
