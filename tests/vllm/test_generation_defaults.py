"""The model card's greedy decoding on vLLM (run in .venv/vllm). generation_config.json says `do_sample: false`, but
vLLM reads only temperature, top_k, top_p, min_p, the penalties and max_new_tokens from it
(`ModelConfig.get_diff_sampling_param`), so a request without `temperature` samples at the OpenAI default 1.0.
The README's server flag `--override-generation-config '{"temperature": 0}'` makes greedy the server's default: a
request without `temperature` then gets the reference's greedy tokens whatever its seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from vllm.engine.arg_utils import EngineArgs
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.utils.argparse_utils import FlexibleArgumentParser

try:  # vLLM >= 0.33
    from vllm.entrypoints.common.cli_args import make_arg_parser
except ImportError:  # vLLM 0.32
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

from tests.server_utils import free_port, reference_text, serve

GREEDY_FLAG = ["--override-generation-config", '{"temperature": 0}']  # as README.md's quick start gives it
PROMPT, MAX_TOKENS = "Once upon a time,", 16


def default_temperature(model: Path, flags: list[str]) -> float:
    """The temperature vLLM's completion endpoint gives a request without one, for a server started with `flags`
    (vLLM's own parser, engine config and request defaults; no engine started)."""
    parser = make_arg_parser(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(model), "--max-model-len", "1024", *flags])
    defaults = EngineArgs.from_cli_args(args).create_engine_config().model_config.get_diff_sampling_param()
    request = CompletionRequest(model=str(model), prompt=PROMPT, max_tokens=MAX_TOKENS)
    return request.to_sampling_params(MAX_TOKENS, defaults).temperature


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_ckpt), "--host",
           "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--gpu-memory-utilization", "0.3",
           "--max-num-seqs", "4", "--block-size", "32", "--dtype", "float32", "--enforce-eager", *GREEDY_FLAG]
    log = tmp_path_factory.mktemp("vllm_gen_defaults") / "server.log"
    with serve(cmd, str(tiny_ckpt), port, log, {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"},
               model_dir=tiny_ckpt) as s:
        yield s


def test_without_the_flag_a_request_without_temperature_samples_at_1(tiny_ckpt: Path):
    card = json.loads((tiny_ckpt / "generation_config.json").read_text())
    assert card.get("do_sample") is False, f"precondition: the card's generation_config.json is greedy: {card}"
    t = default_temperature(tiny_ckpt, [])
    assert t == 1.0, f"vLLM now gives a request without temperature {t} (do_sample: false honoured?): update the " \
        "README's greedy-defaults note"


def test_the_flag_makes_greedy_the_default(tiny_ckpt: Path):
    t = default_temperature(tiny_ckpt, GREEDY_FLAG)
    assert t == 0.0, f"{' '.join(GREEDY_FLAG)} gives a request without temperature {t}, not 0"


def test_with_the_flag_a_request_without_temperature_gets_the_reference_greedy_text(server, tiny_ckpt: Path):
    want = reference_text(tiny_ckpt, PROMPT, MAX_TOKENS)
    texts = []
    for seed in (1, 2):
        r = server.complete(prompt=PROMPT, max_tokens=MAX_TOKENS, seed=seed)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts == [want, want], f"with {GREEDY_FLAG}, requests without temperature (seeds 1, 2) gave {texts}, " \
        f"the reference's greedy text is {want!r}"


def test_with_the_flag_a_request_temperature_still_samples(server):
    """The control of the test above: on this checkpoint two seeds at temperature 1 do give different texts."""
    texts = [server.complete(prompt=PROMPT, max_tokens=MAX_TOKENS, seed=s, temperature=1.0).json()["choices"][0]
             ["text"] for s in (1, 2)]
    assert texts[0] != texts[1], f"two seeds sampled at temperature 1 gave the same text: {texts[0]!r}"
