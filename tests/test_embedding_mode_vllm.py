"""vLLM's pooling runner (`--runner pooling`, which resolves `--convert auto` to `embed` for a *ForCausalLM) with
Cognica: `as_embedding_model` wraps the model class and `DispatchPooler.for_embedding` pools what its forward returns,
the final normed hidden state (lm_head's input), at the last token, L2-normalised, as for vLLM's in-tree Llama.
/v1/embeddings equals the reference's within 1e-4 in float32. The Log-OP head has no single final hidden state and
is refused at start (cognica_vllm.config_checks). Run in .venv/vllm.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
import torch
from vllm.engine.arg_utils import EngineArgs

from cognica.factory import make_checkpoint
from cognica.model import CognicaGPT, load_reference
from tests.server_utils import free_port, reference_and_tokenizer, serve
from tests.utils import random_prompts

pytestmark = pytest.mark.vllm  # the scripts/test.sh step(s) that run this file

ATOL = 1e-4
BOS = 32759
# a single token (no smear), short prompts, and 600 tokens: past the tiny preset's 256-key S window
PROMPTS = [[BOS]] + [[BOS] + p for p in random_prompts([6, 32, 599], seed=11)]


def reference_embedding(ref: CognicaGPT, ids: list[int]) -> torch.Tensor:
    """The reference's last-token input of lm_head (the final normed hidden state), L2-normalised."""
    seen: list[torch.Tensor] = []
    hook = ref.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            ref(torch.tensor([ids]))
    finally:
        hook.remove()
    return torch.nn.functional.normalize(seen[0][0, -1].float(), dim=-1)


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


def embeddings(server, inputs: list[list[int]]) -> list[list[float]]:
    r = requests.post(f"{server.url}/v1/embeddings", json={"model": server.model, "input": inputs}, timeout=300)
    assert r.status_code == 200, f"/v1/embeddings failed: {r.status_code}: {r.text[:500]}"
    return [d["embedding"] for d in sorted(r.json()["data"], key=lambda d: d["index"])]


def test_embeddings_equal_the_reference_final_hidden_state(server, tiny_ckpt):
    ref = load_reference(tiny_ckpt, dtype=torch.float32)
    got = embeddings(server, PROMPTS)  # one request: a batch of different lengths, the long one chunked
    for ids, emb in zip(PROMPTS, got, strict=True):
        want = reference_embedding(ref, ids)
        assert len(emb) == want.numel(), f"{len(ids)} tokens: embedding has {len(emb)} dims, expected {want.numel()}"
        err = (torch.tensor(emb) - want).abs().max().item()
        assert err < ATOL, f"{len(ids)} tokens: embedding off the reference's normed final hidden state by {err:.2e}"


def test_text_input_is_embedded_with_bos_prepended_once(server, tiny_ckpt):
    """A text input is tokenized as for generation, <|bos|> prepended once: its embedding is the reference's of
    those ids."""
    ref, tok = reference_and_tokenizer(tiny_ckpt)
    text = "The capital of France is Paris."
    ids = tok(text).input_ids
    assert ids[0] == BOS and BOS not in ids[1:], f"precondition: the tokenizer should prepend <|bos|> once: {ids[:4]}"
    r = requests.post(f"{server.url}/v1/embeddings", json={"model": server.model, "input": text}, timeout=300)
    assert r.status_code == 200, f"/v1/embeddings failed: {r.status_code}: {r.text[:500]}"
    err = (torch.tensor(r.json()["data"][0]["embedding"]) - reference_embedding(ref, ids)).abs().max().item()
    assert err < ATOL, f"a text input's embedding is off the reference's of <|bos|> + its tokens by {err:.2e}"


def test_embedding_of_a_prompt_alone_equals_it_in_a_batch(server):
    alone = embeddings(server, [PROMPTS[2]])[0]
    batched = embeddings(server, PROMPTS)[2]
    err = max(abs(a - b) for a, b in zip(alone, batched, strict=True))
    assert err < ATOL, f"a prompt's embedding depends on its batch: {err:.2e}"


def test_logop_head_under_the_pooling_runner_is_refused_at_start(tmp_path):
    poe = make_checkpoint(tmp_path / "poe", preset="tiny", seed=5, tokenizer=False, progress=False, n_layer=8,
                          poe_mode="flat", poe_every=2)
    args = EngineArgs(model=str(poe), max_model_len=1024, block_size=32, dtype="float32", skip_tokenizer_init=True,
                      enforce_eager=True, runner="pooling",
                      hf_overrides={"poe_exit_stage": 3, "poe_head": "logop"})
    with pytest.raises(ValueError, match=r"--runner pooling .*poe_head='logop'"):
        args.create_engine_config()
