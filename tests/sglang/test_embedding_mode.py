"""SGLang's embedding mode (`--is-embedding`) with Cognica: /v1/embeddings returns the last token's final normed
hidden state (lm_head's input), L2-normalised, as SGLang pools its in-tree LlamaForCausalLM
(`Pooler(PoolingType.LAST, normalize=True)`); equal to the reference's within 1e-4 in float32. The Log-OP head has
no single final hidden state and is refused in the first process.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" .venv/sglang/bin/python -m pytest \
        tests/sglang/test_embedding_mode.py
"""

from __future__ import annotations

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)

from cognica.factory import make_checkpoint  # noqa: E402
from tests.server_utils import (  # noqa: E402
    EmbeddingTests,
    check_stage_exit_embeddings,
    embeddings,
    tokenized_checkpoint,
)
from tests.sglang_utils import BOS, engine_start_refusal, random_prompt, serve_sglang  # noqa: E402

ATOL = 1e-4
# a single token (no smear), short prompts, and 600 tokens: past the tiny preset's 256-key S window
PROMPTS = [random_prompt(1, seed=0), random_prompt(7, seed=1), random_prompt(33, seed=2), random_prompt(600, seed=3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tokenized_checkpoint(tmp_path_factory.mktemp("embed") / "tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with serve_sglang(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--is-embedding") as s:
        yield s


class TestEmbeddingMode(EmbeddingTests):
    PROMPTS, BOS, ATOL = PROMPTS, BOS, ATOL


def test_stage_prefix_embedding_equals_the_reference_stage_exit(tmp_path):
    """`--json-model-override-args '{"poe_exit_stage": 1}'` on a PoE checkpoint: the pooled hidden state is the
    stage-1 exit's (layers 0-1, no backout), normed and L2-normalised."""
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    with serve_sglang(poe, tmp_path / "server.log", "--is-embedding", "--skip-tokenizer-init",
                      "--json-model-override-args", '{"poe_exit_stage": 1}') as s:
        got = embeddings(s, PROMPTS)
    check_stage_exit_embeddings(poe, 1, PROMPTS, got, ATOL)


def test_logop_head_in_embedding_mode_is_refused_in_the_first_process(tmp_path):
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    rc, out, err = engine_start_refusal(poe, "is_embedding=True, json_model_override_args="
                                        "'{\"poe_exit_stage\": 3, \"poe_head\": \"logop\"}'")
    assert rc == 0, f"the engine started (or crashed) instead of refusing:\n{err[-2000:]}"
    assert "STARTED 0 REFUSED ValueError" in out and "poe_head='logop'" in out, \
        f"the refusal should be one ValueError naming poe_head='logop', before any engine process: {out[-1000:]}"
