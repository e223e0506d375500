"""First use on SGLang: the card's `sglang.launch_server --model-path <id>` in its CPU form, against an offline hub
cache laid out exactly as downloaded (tokenizer.pkl, no tokenizer.json, remote code that marks any import); run in
.venv/sglang with SGLANG_USE_CPU_ENGINE=1 PYTHONPATH=tests/sgl_stub."""

from __future__ import annotations

import sys

import pytest
import torch

from cognica.model import load_reference
from cognica.tokenizer import load_tiktoken_pickle
from tests.hub_fixture import (
    BP_REPO,
    CARD_PROMPT,
    HubRepo,
    assert_server_answers_with_unwritable_cache,
    assert_server_refuses_hostile_pickle,
    bp_hub,
    damaged_cache,
    snapshot_state,
)
from tests.server_utils import KV_ALLOCATION_LOG, free_port, serve
from tests.utils import assert_fp32_parity

pytestmark = pytest.mark.sglang  # the scripts/test.sh step(s) that run this file

BOS_ID = 32759
CONVERTED = "cognica: converted"


def launch_server(port: int) -> list[str]:
    """The card's `python3 -m sglang.launch_server --model-path "cognica/Cognica-BP-v1.0-1.3B-base"` in its CPU
    form (README), sized for the tests."""
    return [sys.executable, "-m", "sglang.launch_server", "--model-path", BP_REPO, "--host", "127.0.0.1", "--port",
            str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
            "--skip-server-warmup", "--dtype", "float32", "--max-total-tokens", "4096"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[HubRepo, dict]:
    return bp_hub(tmp_path_factory)


@pytest.fixture(scope="module")
def server(hub, tmp_path_factory: pytest.TempPathFactory):
    repo, _ = hub
    port, log = free_port(), tmp_path_factory.mktemp("sglang_first_use") / "server.log"
    with serve(launch_server(port), BP_REPO, port, log, repo.env(), unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",),
               startup_s=400) as s:
        yield s


def test_card_curl_request_answers_with_bos_and_reference_greedy_tokens(hub, server):
    repo, _ = hub
    card = server.complete(prompt=CARD_PROMPT, max_tokens=16, temperature=0.5)  # the card's body, fewer tokens
    assert card.status_code == 200 and card.json()["choices"][0]["text"], f"card request failed: {card.text[:300]}"
    r = server.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0,
                        return_token_ids=True)  # choices[].token_ids: _build_completion_response
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt_ids = [BOS_ID, *load_tiktoken_pickle(repo.snapshot / "tokenizer.pkl").encode_ordinary(CARD_PROMPT)]
    assert choice["prompt_token_ids"] == prompt_ids, f"<|bos|> must be prepended once: {choice['prompt_token_ids']}"
    ref = load_reference(repo.snapshot, dtype=torch.float32)
    assert_fp32_parity(ref, prompt_ids, choice["token_ids"], choice["logprobs"]["token_logprobs"],
                       "SGLang server on the Hub id")


def test_the_tokenizer_is_converted_once_across_the_server_processes(hub, server):
    repo, _ = hub
    lines = [x for x in server.log.read_text().splitlines() if CONVERTED in x]
    assert len(lines) == 1 and str(repo.snapshot / "tokenizer.pkl") in lines[0], \
        f"tokenizer.pkl must be converted exactly once for all of SGLang's processes: {lines}"


def test_damaged_cache_entry_is_replaced_and_the_served_ids_are_the_reference_s(hub, tmp_path):
    repo, _ = hub
    env, entry = damaged_cache(repo, tmp_path, "remapped")  # valid JSON, other ids: the silent damage
    port, log = free_port(), tmp_path / "server.log"
    with serve(launch_server(port), BP_REPO, port, log, env, unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",),
               startup_s=400) as s:
        r = s.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0, return_token_ids=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    prompt_ids = [BOS_ID, *load_tiktoken_pickle(repo.snapshot / "tokenizer.pkl").encode_ordinary(CARD_PROMPT)]
    assert choice["prompt_token_ids"] == prompt_ids, \
        f"the server tokenized with the damaged entry: {choice['prompt_token_ids']}"
    assert_fp32_parity(load_reference(repo.snapshot, dtype=torch.float32), prompt_ids, choice["token_ids"],
                       choice["logprobs"]["token_logprobs"], "SGLang server after a damaged cache entry")
    lines = [x for x in log.read_text().splitlines() if str(entry) in x]
    assert len(lines) == 1, f"one warning naming the damaged entry expected (all processes together): {lines}"


def test_unwritable_cache_does_not_stop_the_server(hub, tmp_path):
    repo, _ = hub
    port = free_port()
    assert_server_answers_with_unwritable_cache(launch_server(port), port, repo.env(), tmp_path,
                                                unset=("SGLANG_EXTERNAL_MODEL_PACKAGE",), startup_s=400)


def test_hostile_tokenizer_pkl_stops_the_server_before_the_engine(tmp_path_factory):
    assert_server_refuses_hostile_pickle(launch_server(free_port()), {}, KV_ALLOCATION_LOG["sglang"], tmp_path_factory)


def test_remote_code_never_imported_and_snapshot_unchanged(hub, server):
    repo, state = hub
    assert not repo.marker.exists(), "a *_cognica_poe.py file of the repo was imported"
    assert snapshot_state(repo.snapshot) == state, "the hub snapshot was modified"
