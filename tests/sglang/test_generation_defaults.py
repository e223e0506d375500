"""The model card's greedy decoding on SGLang 0.5.23. generation_config.json says `do_sample: false`, which SGLang
does not read (`ModelConfig.get_default_sampling_params` takes temperature, top_k, top_p, min_p and
repetition_penalty only, and the card sets none of them), so a request without `temperature` samples at 1.0.
The README's server flag `--preferred-sampling-params '{"temperature": 0}'` fills in what a native `/generate`
request leaves out (`TokenizerManager`: `{**preferred_sampling_params, **request's}`), so there greedy becomes the
default; the OpenAI endpoints always send their own temperature (`/v1/completions`: the request model's default
1.0), so there greedy still takes `"temperature": 0` in the request.

    SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" .venv/sglang/bin/python -m pytest \
        tests/sglang/test_generation_defaults.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from tests.server_utils import reference_text  # noqa: E402
from tests.sglang_utils import serve_sglang  # noqa: E402

GREEDY_FLAG = ["--preferred-sampling-params", '{"temperature": 0}']  # as README.md's quick start gives it
PROMPT, MAX_TOKENS = "Once upon a time,", 16


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    with serve_sglang(tiny_ckpt, tmp_path_factory.mktemp("sglang_gen_defaults") / "server.log", *GREEDY_FLAG) as s:
        yield s


def generate_text(server, **sampling_params) -> str:
    r = requests.post(f"{server.url}/generate", timeout=120,
                      json={"text": PROMPT, "sampling_params": {"max_new_tokens": MAX_TOKENS, **sampling_params}})
    assert r.status_code == 200, r.text
    return r.json()["text"]


def test_without_the_flag_a_request_without_temperature_samples_at_1(tiny_ckpt: Path):
    card = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert card.get("do_sample") is False, f"precondition: the card's generation_config.json is greedy: {card}"
    assert not {"temperature", "top_k", "top_p", "min_p"} & card.keys(), f"precondition: no sampling values: {card}"
    t = SamplingParams().temperature
    assert t == 1.0, f"SGLang's default temperature is now {t}: update the README's greedy-defaults note"


def test_with_the_flag_a_generate_request_without_temperature_gets_the_reference_greedy_text(server, tiny_ckpt):
    want = reference_text(tiny_ckpt, PROMPT, MAX_TOKENS)
    texts = [generate_text(server) for _ in range(2)]
    assert texts == [want, want], f"with {GREEDY_FLAG}, /generate requests without temperature gave {texts}; the " \
        f"reference's greedy text is {want!r}"


def test_with_the_flag_a_generate_request_temperature_still_samples(server):
    """The control of the test above: on this checkpoint two requests sampled at temperature 1 differ."""
    texts = [generate_text(server, temperature=1.0) for _ in range(2)]
    assert texts[0] != texts[1], f"two requests sampled at temperature 1 gave the same text: {texts[0]!r}"


def test_openai_completions_ignore_the_flag_and_sample_without_temperature(server, tiny_ckpt):
    """What the README says of /v1/completions: its request model sends temperature 1.0 whenever the client sends
    none, which overrides the preferred parameters; greedy there needs "temperature": 0 in the request."""
    texts = [server.complete(prompt=PROMPT, max_tokens=MAX_TOKENS).json()["choices"][0]["text"] for _ in range(2)]
    assert texts[0] != texts[1], "/v1/completions without temperature now gives the same text twice: greedy by " \
        f"default with {GREEDY_FLAG}? Update the README: {texts[0]!r}"
    greedy = server.complete(prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0).json()["choices"][0]["text"]
    assert greedy == reference_text(tiny_ckpt, PROMPT, MAX_TOKENS), "a greedy /v1/completions differs from the " \
        "reference"
