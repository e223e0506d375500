"""SGLang's embedding mode (`--is-embedding`) with Cognica: /v1/embeddings returns the last token's final normed
hidden state (lm_head's input), L2-normalised, as SGLang pools its in-tree LlamaForCausalLM
(`Pooler(PoolingType.LAST, normalize=True)`); equal to the reference's within 1e-4 in float32. The Log-OP head has
no single final hidden state and is refused in the first process.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/sgl_stub .venv/sglang/bin/python -m pytest \
        tests/test_embedding_mode_sglang.py
"""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.sglang

import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)

from cognica.factory import make_checkpoint  # noqa: E402
from tests.server_utils import (  # noqa: E402
    check_embedding_alone_equals_batched,
    check_embeddings_equal_reference,
    check_stage_exit_embeddings,
    check_text_embedding_has_bos_once,
    embeddings,
    free_port,
    serve,
)
from tests.sglang_utils import BOS, random_prompt  # noqa: E402

ATOL = 1e-4
# a single token (no smear), short prompts, and 600 tokens: past the tiny preset's 256-key S window
PROMPTS = [random_prompt(1, seed=0), random_prompt(7, seed=1), random_prompt(33, seed=2), random_prompt(600, seed=3)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cognica.tokenizer import convert_tokenizer

    out = make_checkpoint(tmp_path_factory.mktemp("embed"), preset="tiny", seed=0, tokenizer=True, progress=False)
    convert_tokenizer(out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--device", "cpu",
           "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "8192", "--is-embedding"]
    log = tmp_path_factory.mktemp("log") / "server.log"
    with serve(cmd, "default", port, log, unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",), startup_s=300,
               model_dir=model_dir) as s:
        yield s


def test_embeddings_equal_the_reference_final_hidden_state(server):
    check_embeddings_equal_reference(server, PROMPTS, ATOL)  # one request: a batch of different lengths


def test_text_input_is_embedded_with_bos_prepended_once(server):
    check_text_embedding_has_bos_once(server, BOS, ATOL)


def test_embedding_of_a_prompt_alone_equals_it_in_a_batch(server):
    check_embedding_alone_equals_batched(server, PROMPTS, ATOL)


def test_stage_prefix_embedding_equals_the_reference_stage_exit(tmp_path):
    """`--json-model-override-args '{"poe_exit_stage": 1}'` on a PoE checkpoint: the pooled hidden state is the
    stage-1 exit's (layers 0-1, no backout), normed and L2-normalised."""
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    port = free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(poe), "--device", "cpu",
           "--attention-backend", "torch_native", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--disable-cuda-graph", "--skip-server-warmup", "--max-total-tokens", "8192", "--is-embedding",
           "--skip-tokenizer-init", "--json-model-override-args", '{"poe_exit_stage": 1}']
    with serve(cmd, "default", port, tmp_path / "server.log", unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",),
               startup_s=300, model_dir=poe) as s:
        got = embeddings(s, PROMPTS)
    check_stage_exit_embeddings(poe, 1, PROMPTS, got, ATOL)


def test_logop_head_in_embedding_mode_is_refused_in_the_first_process(tmp_path):
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    code = (
        "import sglang, sys\n"
        "try:\n"
        f"    sglang.Engine(model_path={str(poe)!r}, device='cpu', attention_backend='torch_native',"
        " skip_tokenizer_init=True, disable_cuda_graph=True, skip_server_warmup=True, max_total_tokens=4096,"
        " is_embedding=True, json_model_override_args='{\"poe_exit_stage\": 3, \"poe_head\": \"logop\"}',"
        " log_level='error')\n"
        "except Exception as e:\n"
        "    print('REFUSED', type(e).__name__, e)\n"
        "    sys.exit(0)\n"
        "sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert proc.returncode == 0, f"the engine started (or crashed) instead of refusing:\n{proc.stderr[-2000:]}"
    assert "REFUSED ValueError" in proc.stdout and "poe_head='logop'" in proc.stdout, \
        f"the refusal should be one ValueError naming poe_head='logop': {proc.stdout[-1000:]}"
