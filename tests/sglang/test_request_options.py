"""Every request option of SGLang's OpenAI and native APIs that could reach the model, sent one after another to one
server: each gets an answer or a 4xx with a message (never a 5xx, a scheduler death or a dropped connection), and
after each the server still gives the reference's greedy completion of a plain prompt. `expect` pins what the option
did on SGLang 0.5.23 (the README's feature table cites it): "ok" a 200, "4xx" a client error, "any" either.

The server runs with --disable-radix-cache (without it SGLang's tokenizer manager refuses `input_embeds` itself, so
they would never reach the plugin's per-request refusal), --enable-custom-logit-processor and
--enable-return-hidden-states, so those options reach the model instead of meeting SGLang's own flag checks.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" .venv/sglang/bin/python -m pytest \
        tests/sglang/test_request_options.py
"""

from __future__ import annotations

import pytest
import sglang  # noqa: E402, F401  (a missing engine is a failure, not a skip)
from sglang.srt.sampling.custom_logit_processor import DisallowedTokensLogitsProcessor  # noqa: E402

from tests.server_utils import (  # noqa: E402
    PLAIN,
    SHARED_COMPLETION_OPTIONS,
    check_request_option,
    completion,
    reference_text,
    tokenized_checkpoint,
)
from tests.sglang_utils import serve_sglang  # noqa: E402

BOS = 32759
JSON_SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
PROCESSOR = DisallowedTokensLogitsProcessor.to_str()


def generate(**kw) -> tuple[str, dict]:
    return "/generate", {"input_ids": [BOS, 10, 20, 30], "sampling_params": {"max_new_tokens": 4}, **kw}


# (name, (path, body), expect): the options both engines answer alike, then this engine's own
OPTIONS: list[tuple[str, tuple[str, dict], str]] = [
    *SHARED_COMPLETION_OPTIONS,
    ("best_of", completion(best_of=3, n=1), "ok"),
    ("stop, stop_token_ids, stop_regex", completion(stop=["e"], stop_token_ids=[32763], stop_regex="[0-9]"), "ok"),
    ("structured json_schema", completion(json_schema=JSON_SCHEMA, max_tokens=12), "ok"),
    ("structured regex", completion(regex="[0-9]{3}", max_tokens=6), "ok"),
    ("structured ebnf", completion(ebnf='root ::= "yes" | "no"'), "ok"),
    ("response_format json_schema", completion(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        max_tokens=8), "ok"),
    ("return_hidden_states", completion(return_hidden_states=True), "ok"),
    ("return_hidden_states last", completion(return_hidden_states="last"), "ok"),
    ("custom_logit_processor", completion(custom_logit_processor=PROCESSOR, custom_params={"token_ids": [5, 6]}),
     "ok"),
    ("lora_path without LoRA", completion(lora_path="some-adapter"), "4xx"),
    ("ignore_eos, no_stop_trim, skip_special_tokens off",
     completion(ignore_eos=True, no_stop_trim=True, skip_special_tokens=False), "ok"),
    ("return_token_ids", completion(return_token_ids=True), "ok"),
    ("return_cached_tokens_details", completion(return_cached_tokens_details=True), "ok"),
    ("return_routed_experts (no experts)", completion(return_routed_experts=True), "ok"),
    ("streaming with usage", completion(stream=True, stream_options={"include_usage": True}, logprobs=1), "ok"),
    ("suffix", completion(suffix="!"), "ok"),
    ("priority", completion(priority=1), "ok"),
    ("cache_salt and extra_key", completion(cache_salt="salt", extra_key="k"), "ok"),
    ("session_id of no session", completion(session_id="nope"), "ok"),
    ("native: prompt logprobs, top logprobs, token_ids_logprob",
     generate(return_logprob=True, logprob_start_len=0, top_logprobs_num=3, token_ids_logprob=[1, 2],
              return_text_in_logprobs=True), "ok"),
    ("native: return_hidden_states", generate(return_hidden_states=True), "ok"),
    ("native: custom_logit_processor",
     generate(custom_logit_processor=PROCESSOR,
              sampling_params={"max_new_tokens": 4, "custom_params": {"token_ids": [5, 6]}}), "ok"),
    ("native: streaming", generate(stream=True), "ok"),
    ("native: input_embeds", ("/generate", {"input_embeds": [[0.0] * 128] * 4, "sampling_params": {
        "max_new_tokens": 2}}), "4xx"),
    ("native: input_embeds beside input_ids (SGLang drops the embeds)", generate(input_embeds=[[0.0] * 128] * 4),
     "ok"),
    ("native: positional_embed_overrides", generate(positional_embed_overrides={"embeds": [[0.0] * 128],
                                                                                "positions": [1]}), "4xx"),
    ("native: lora_path without LoRA", generate(lora_path="some-adapter"), "4xx"),
    ("chat completion (base model: no chat template)",
     ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}), "4xx"),
    ("embeddings on a generate server", ("/v1/embeddings", {"input": "hi"}), "4xx"),
    ("tokenize", ("/v1/tokenize", {"prompt": "hi there"}), "ok"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tokenized_checkpoint(tmp_path_factory.mktemp("options") / "tiny")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with serve_sglang(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--disable-radix-cache",
                      "--enable-custom-logit-processor", "--enable-return-hidden-states") as s:
        yield s


@pytest.fixture(scope="module")
def plain_answer(model_dir) -> str:
    return reference_text(model_dir, PLAIN["prompt"], PLAIN["max_tokens"])


@pytest.mark.parametrize("name, request_, expect", OPTIONS, ids=[o[0] for o in OPTIONS])
def test_option_gets_an_answer_or_a_4xx_and_the_server_still_answers_correctly(server, plain_answer, record_property,
                                                                              name, request_, expect):
    check_request_option(server, "SGLang", name, request_, expect, PLAIN, plain_answer, record_property)
