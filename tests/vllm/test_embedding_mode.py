"""vLLM's pooling runner (`--runner pooling`, which resolves `--convert auto` to `embed` for a *ForCausalLM) with
Cognica: `as_embedding_model` wraps the model class and `DispatchPooler.for_embedding` pools what its forward returns,
the final normed hidden state (lm_head's input), at the last token, L2-normalised, as for vLLM's in-tree Llama.
/v1/embeddings equals the reference's within 1e-4 in float32. The Log-OP head has no single final hidden state and
is refused at start (cognica_vllm.config_checks). Run in .venv/vllm.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs

from cognica.factory import make_checkpoint
from tests.server_utils import (
    EmbeddingTests,
    check_stage_exit_embeddings,
    free_port,
    serve,
)
from tests.utils import random_prompts

ATOL = 1e-4
BOS = 32759
# a single token (no smear), short prompts, and 600 tokens: past the tiny preset's 256-key S window
PROMPTS = [[BOS]] + [[BOS] + p for p in random_prompts([6, 32, 599], seed=11)]


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--block-size", "32", "--dtype", "float32",
           "--max-num-batched-tokens", "256", "--runner", "pooling"]  # compiled, as users run it
    log = tmp_path_factory.mktemp("vllm_embed") / "server.log"
    with serve(cmd, str(tiny_ckpt), port, log, {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
               model_dir=tiny_ckpt) as s:
        yield s


class TestEmbeddingMode(EmbeddingTests):
    PROMPTS, BOS, ATOL = PROMPTS, BOS, ATOL


def test_stage_prefix_embedding_equals_the_reference_stage_exit(tmp_path, monkeypatch):
    """`hf_overrides={"poe_exit_stage": 1}` (`--hf-overrides`) on a PoE checkpoint: the pooled hidden state is the
    stage-1 exit's (layers 0-1, no backout), normed and L2-normalised. In-process and eager, to keep it cheap."""
    from vllm import LLM

    from cognica.tokenizer import convert_tokenizer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, progress=False, n_layer=8, poe_mode="flat",
                          poe_every=2)
    convert_tokenizer(poe)  # the pooling path renders prompts through the tokenizer, token ids included
    llm = LLM(model=str(poe), runner="pooling", hf_overrides={"poe_exit_stage": 1}, max_model_len=1024,
              block_size=32, dtype="float32", enforce_eager=True, max_num_batched_tokens=256, seed=0)
    try:
        got = [o.outputs.embedding for o in llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)]
    finally:
        del llm
        gc.collect()
    check_stage_exit_embeddings(poe, 1, PROMPTS, got, ATOL)


def test_logop_head_under_the_pooling_runner_is_refused_at_start(tmp_path):
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    args = EngineArgs(model=str(poe), max_model_len=1024, block_size=32, dtype="float32", skip_tokenizer_init=True,
                      enforce_eager=True, runner="pooling",
                      hf_overrides={"poe_exit_stage": 3, "poe_head": "logop"})
    with pytest.raises(ValueError, match=r"--runner pooling .*poe_head='logop'"):
        args.create_engine_config()
