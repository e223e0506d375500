"""SGLang at the release's context and windows, and retraction (SGLang's preemption) under a small KV pool.

The tiny preset at `sequence_len` 2048 has the released model's windows (S: 512 keys before the query; the L layer
2048, so it never slides inside the context) at a 128 width. One float32 engine serves every test here: prompts of
1,500-2,040 tokens prefilled in chunks of 256, then a batch that overflows a 3,072-token KV pool, which SGLang
answers by retracting requests and re-prefilling them later (prompt + the tokens they had generated).

Run in SGLang's own venv, like tests/sglang/test_parity.py.
"""

from __future__ import annotations

import pytest
import sglang  # noqa: E402  (a missing engine is a failure, not a skip)
import torch

from cognica.config import CognicaConfig  # noqa: E402
from cognica.factory import make_checkpoint  # noqa: E402
from cognica.model import load_reference  # noqa: E402
from tests.sglang_utils import ENGINE_ARGS, EngineSlot, check_parity, random_prompt, run  # noqa: E402

CONTEXT = 2048
CHUNK = 256
# SGLang refuses prompts longer than context - 6 (shared/spec/engines.md) and caps a request at context - 2 tokens in
# all: max_req_len = context - 1 (`TpModelWorker.get_worker_info` in sglang/srt/managers/tp_worker.py), max_new_tokens
# <= max_req_len - prompt - 1 (`Scheduler.init_req_max_new_tokens` in sglang/srt/managers/scheduler.py). So 2040 + 6 is
# the longest sequence; asking for more silently gives 6 tokens.
LONG = [(1500, 40), (1777, 24), (2040, 6)]
POOL = 3072  # max_total_tokens: one 2,048-token sequence fits, the retraction batch below does not
N_RETRACT, RETRACT_PROMPT, RETRACT_NEW = 4, 700, 150  # 4 x 850 tokens, past the 512-key S window
# SGLang admits a request when its prompt plus its max_new_tokens fits next to the running requests' estimated
# growth, both estimates clipped to SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION (`CLIP_MAX_NEW_TOKENS` in
# sglang/srt/managers/schedule_policy.py, read when the scheduler process imports it; used in `PrefillAdder.add_one_req`
# and `PrefillAdder._get_running_request_total_token_offset`). By default it admits only as many requests as can
# finish, so nothing is retracted; clipped to 64 it admits all 4 (4 x 764 <= 3,072), which then outgrow the pool
# on their way to 4 x 850 tokens; the 3 left running fit.
CLIP_ESTIMATE = "64"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("release_shape"), preset="tiny", seed=0, tokenizer=False,
                           progress=False, sequence_len=CONTEXT)


@pytest.fixture(scope="module")
def ref(ckpt):
    return load_reference(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(ckpt):
    slot = EngineSlot(ckpt, max_total_tokens=POOL, chunked_prefill_size=CHUNK)
    with pytest.MonkeyPatch.context() as mp:  # inherited by the scheduler process at its start
        mp.setenv("SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION", CLIP_ESTIMATE)
        engine = slot.get("fp32", dtype="float32")
    yield engine
    slot.close()


def test_checkpoint_has_the_release_windows(ref):
    cfg: CognicaConfig = ref.config
    assert cfg.sequence_len == 2048 and cfg.window_letters == "SSSL", cfg
    assert cfg.window_left == (512, 512, 512, 2048), f"release windows expected, got {cfg.window_left}"


def test_context_longer_than_the_training_context_is_refused(ckpt):
    """Position 2,049 (where L layers would start sliding) is out of reach: a 4096 context is refused at start."""
    with pytest.raises(ValueError) as err:
        sglang.Engine(model_path=str(ckpt), **{**ENGINE_ARGS, "dtype": "float32", "context_length": 4096})
    msg = str(err.value)
    assert "4096" in msg and "2048" in msg, f"the refusal should name both lengths: {msg}"


def test_long_prompts_in_chunks_match_reference(engine, ref):
    """Every prompt position (chunk boundaries included) and every new token, up to the full 2,048 context."""
    prompts = [random_prompt(n, seed=2000 + n) for n, _ in LONG]
    for (n, n_new), prompt in zip(LONG, prompts):
        (out,) = run(engine, [prompt], n_new)
        assert len(out["meta_info"]["input_token_logprobs"]) == n, "all prompt logprobs should come back"
        check_parity(ref, prompt, out, n_new, f"{n}-token prompt, {n_new} new tokens", chunk=CHUNK)


def test_retraction_recomputes_exactly(engine, ref):
    """4 requests of 700 + 150 tokens overflow the 3,072-token pool: SGLang retracts some mid-decode and re-prefills
    them with the tokens they had generated (`ScheduleBatch.retract_decode`, from `Scheduler.update_running_batch`;
    reported per request as meta_info["num_retractions"] by `TokenizerManager._handle_batch_output`). Every greedy
    answer equals the reference's (tokens identical, logprobs within 1e-3), and each retracted one also equals the same
    request run alone."""
    prompts = [random_prompt(RETRACT_PROMPT, seed=3000 + i) for i in range(N_RETRACT)]
    outs = run(engine, prompts, RETRACT_NEW, start=RETRACT_PROMPT - 1)
    retractions = [o["meta_info"]["num_retractions"] for o in outs]
    assert sum(retractions) > 0, f"the batch should have overflowed the {POOL}-token pool: {retractions}"
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        what = f"request {i} (retracted {retractions[i]}x)"
        if retractions[i]:
            (alone,) = run(engine, [prompt], RETRACT_NEW, start=RETRACT_PROMPT - 1)
            assert out["output_ids"] == alone["output_ids"], f"{what}: differs from the same request alone"
        check_parity(ref, prompt, out, RETRACT_NEW, what)
