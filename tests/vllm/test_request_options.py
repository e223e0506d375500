"""Every request option of vLLM's OpenAI server that could reach the model, sent one after another to one server
(run in .venv/vllm): each gets an answer or a 4xx with a message (never a 5xx or a dropped connection), and after
each the server still gives the reference's greedy completion of a plain prompt. `expect` pins what the option did
on vLLM 0.32 (the README's feature table cites it): "ok" a 200, "4xx" a client error, "any" either.
`--enable-prompt-embeds` is refused at start (tests/vllm/test_config_checks.py), so `prompt_embeds` meets vLLM's
own "not enabled" check here."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.server_utils import (
    KV_ALLOCATION_LOG,
    PLAIN,
    SHARED_COMPLETION_OPTIONS,
    check_request_option,
    completion,
    free_port,
    reference_text,
    serve,
)

JSON_SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def prompt_embeds_b64() -> str:
    buf = io.BytesIO()
    torch.save(torch.zeros(4, 64), buf)
    return base64.b64encode(buf.getvalue()).decode()


# (name, (path, body), expect): the options both engines answer alike, then this engine's own
OPTIONS: list[tuple[str, tuple[str, dict], str]] = [
    *SHARED_COMPLETION_OPTIONS,
    ("prompt_logprobs", completion(prompt_logprobs=3), "ok"),
    ("logprobs=-1 (whole vocabulary)", completion(logprobs=-1, max_tokens=2), "4xx"),
    ("prompt_logprobs=-1 (whole vocabulary)", completion(prompt_logprobs=-1, max_tokens=1), "4xx"),
    ("best_of (not in vLLM 0.32's API: ignored)", completion(best_of=3, n=1), "ok"),
    ("use_beam_search", completion(use_beam_search=True, n=2, temperature=0), "ok"),
    ("stop and stop_token_ids", completion(stop=["e", "\n"], stop_token_ids=[32763], temperature=0), "ok"),
    ("allowed_token_ids", completion(allowed_token_ids=[10, 11, 12]), "ok"),
    ("bad_words", completion(bad_words=["the", "a"]), "ok"),
    ("structured json_schema", completion(structured_outputs={"json": JSON_SCHEMA}, max_tokens=12), "ok"),
    ("structured regex", completion(structured_outputs={"regex": "[0-9]{3}"}, max_tokens=6), "ok"),
    ("structured choice", completion(structured_outputs={"choice": ["yes", "no"]}), "ok"),
    ("response_format json_object", completion(response_format={"type": "json_object"}, max_tokens=8), "ok"),
    ("truncate_prompt_tokens", completion(prompt="a b c d e f g h", truncate_prompt_tokens=3), "ok"),
    ("ignore_eos and skip_special_tokens off", completion(ignore_eos=True, skip_special_tokens=False), "ok"),
    ("return_tokens_as_token_ids", completion(logprobs=1, return_tokens_as_token_ids=True), "ok"),
    ("return_token_ids", completion(return_token_ids=True), "ok"),
    ("logprob_token_ids", completion(logprobs=1, logprob_token_ids=[1, 2, 3]), "ok"),
    ("prompt token ids with logprobs", completion(prompt=[32759, 1, 2, 3], logprobs=2, prompt_logprobs=2), "ok"),
    ("streaming with usage", completion(stream=True, stream_options={"include_usage": True}, logprobs=1), "ok"),
    ("suffix (no FIM rendering)", completion(suffix="!"), "4xx"),
    ("priority (fcfs scheduler)", completion(priority=1), "ok"),
    ("cache_salt", completion(cache_salt="salt"), "ok"),
    ("kv_transfer_params without a connector", completion(kv_transfer_params={"do_remote_prefill": True}), "ok"),
    ("vllm_xargs", completion(vllm_xargs={"x": 1}), "ok"),
    ("watermarking", completion(watermarking=True), "ok"),
    ("prompt_embeds (flag off)", ("/v1/completions", {"prompt_embeds": prompt_embeds_b64(), "max_tokens": 2}),
     "4xx"),
    ("LoRA adapter name without LoRA", ("/v1/completions", {"model": "base:adapter", "prompt": "hi",
                                                             "max_tokens": 2}), "4xx"),
    ("chat completion (base model: no chat template)",
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}), "4xx"),
    ("embeddings on a generate server", ("/v1/embeddings", {"input": "hi"}), "4xx"),
    ("tokenize", ("/tokenize", {"prompt": "hi there"}), "ok"),
]


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--max-num-seqs", "8", "--block-size", "32",
           "--dtype", "float32", "--enforce-eager"]
    log = tmp_path_factory.mktemp("vllm_options") / "server.log"
    with serve(cmd, str(tiny_ckpt), port, log, {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
               model_dir=tiny_ckpt) as s:
        yield s


@pytest.fixture(scope="module")
def plain_answer(tiny_ckpt: Path) -> str:
    return reference_text(tiny_ckpt, PLAIN["prompt"], PLAIN["max_tokens"])


@pytest.mark.parametrize("name, request_, expect", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_option_gets_an_answer_or_a_4xx_and_the_server_still_answers_correctly(server, plain_answer, record_property,
                                                                              name, request_, expect):
    check_request_option(server, "vLLM", name, request_, expect, PLAIN, plain_answer, record_property)


def test_api_server_refuses_enable_prompt_embeds_at_start_with_one_line(tiny_ckpt: Path):
    """The user-facing side of cognica_vllm.config_checks: `--enable-prompt-embeds` stops the OpenAI server in its
    first process, naming the flag and why, before any KV cache exists."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--port",
           str(free_port()), "--max-model-len", "1024", "--block-size", "32", "--dtype", "float32", "--enforce-eager",
           "--enable-prompt-embeds"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, start_new_session=True,
                          env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    line = "--enable-prompt-embeds (value embeddings and smear need token ids)"
    assert proc.returncode != 0, f"the server started with --enable-prompt-embeds:\n{proc.stderr[-2000:]}"
    assert line in proc.stderr, f"the refusal should name the flag and why ({line!r}):\n{proc.stderr[-3000:]}"
    assert KV_ALLOCATION_LOG["vllm"] not in proc.stdout + proc.stderr, "a KV cache was allocated before the refusal"
