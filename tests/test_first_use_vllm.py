"""First use on vLLM: the card's CPU-form command on the Hub id, against an offline hub cache laid out exactly as
downloaded (tokenizer.pkl, no tokenizer.json, remote code that marks any import); run in .venv/vllm."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests
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

pytestmark = pytest.mark.vllm  # the scripts/test.sh step(s) that run this file

BOS_ID = 32759
CONVERTED = "cognica: converted"


def api_server(port: int) -> list[str]:
    """The card's `vllm serve "cognica/Cognica-BP-v1.0-1.3B-base"` in its CPU form (README), sized for the tests."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", BP_REPO, "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
            "--max-num-seqs", "4"]


ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> tuple[HubRepo, dict]:
    return bp_hub(tmp_path_factory)


@pytest.fixture(scope="module")
def first_start(hub, tmp_path_factory: pytest.TempPathFactory):
    repo, _ = hub
    port, log = free_port(), tmp_path_factory.mktemp("vllm_first") / "server.log"
    with serve(api_server(port), BP_REPO, port, log, {**ENV, **repo.env()}) as server:
        yield server


def test_card_curl_request_answers_with_bos_and_reference_greedy_tokens(hub, first_start):
    repo, _ = hub
    card = first_start.complete(prompt=CARD_PROMPT, max_tokens=16, temperature=0.5)  # the card's body, fewer tokens
    assert card.status_code == 200 and card.json()["choices"][0]["text"], f"card request failed: {card.text[:300]}"
    r = first_start.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0,
                             return_tokens_as_token_ids=True)
    assert r.status_code == 200, r.text
    prompt_ids = [BOS_ID, *load_tiktoken_pickle(repo.snapshot / "tokenizer.pkl").encode_ordinary(CARD_PROMPT)]
    assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids), f"<|bos|> must be prepended once: {r.json()['usage']}"
    lp = r.json()["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
    ref = load_reference(repo.snapshot, dtype=torch.float32)
    assert_fp32_parity(ref, prompt_ids, tokens, lp["token_logprobs"], "vLLM server on the Hub id")


def test_first_start_converts_the_tokenizer_once(hub, first_start):
    repo, _ = hub
    lines = [x for x in first_start.log.read_text().splitlines() if CONVERTED in x]
    assert len(lines) == 1 and str(repo.snapshot / "tokenizer.pkl") in lines[0], \
        f"the first start must convert tokenizer.pkl exactly once (all processes together): {lines}"


def test_second_start_does_not_convert_again(hub, first_start, tmp_path):
    repo, _ = hub
    cache = Path(repo.env()["COGNICA_CACHE_DIR"]) / "tokenizers"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")}
    assert before, "the first start left no converted tokenizer in the cache"
    port, log = free_port(), tmp_path / "second.log"
    with serve(api_server(port), BP_REPO, port, log, {**ENV, **repo.env()}) as server:
        r = server.complete(prompt=CARD_PROMPT, max_tokens=2, temperature=0)
        assert r.status_code == 200, r.text
    assert CONVERTED not in log.read_text(), "the second start converted tokenizer.pkl again"
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")} == before, "cache was rewritten"


def test_damaged_cache_entry_is_replaced_and_the_served_ids_are_the_reference_s(hub, tmp_path):
    repo, _ = hub
    env, entry = damaged_cache(repo, tmp_path, "remapped")  # valid JSON, other ids: the silent damage
    port, log = free_port(), tmp_path / "server.log"
    with serve(api_server(port), BP_REPO, port, log, {**ENV, **env}) as server:
        served = requests.post(f"{server.url}/tokenize", json={"model": BP_REPO, "prompt": CARD_PROMPT}, timeout=60)
        r = server.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0,
                            return_tokens_as_token_ids=True)
    prompt_ids = [BOS_ID, *load_tiktoken_pickle(repo.snapshot / "tokenizer.pkl").encode_ordinary(CARD_PROMPT)]
    assert served.status_code == 200 and served.json()["tokens"] == prompt_ids, \
        f"the server tokenized with the damaged entry: {served.text[:300]}"
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
    assert_fp32_parity(load_reference(repo.snapshot, dtype=torch.float32), prompt_ids, tokens, lp["token_logprobs"],
                       "vLLM server after a damaged cache entry")
    lines = [x for x in log.read_text().splitlines() if str(entry) in x]
    assert len(lines) == 1, f"one warning naming the damaged entry expected (all processes together): {lines}"


def test_unwritable_cache_does_not_stop_the_server(hub, tmp_path):
    repo, _ = hub
    port = free_port()
    assert_server_answers_with_unwritable_cache(api_server(port), port, {**ENV, **repo.env()}, tmp_path)


def test_hostile_tokenizer_pkl_stops_the_server_before_the_engine(tmp_path_factory):
    assert_server_refuses_hostile_pickle(api_server(free_port()), ENV, KV_ALLOCATION_LOG["vllm"], tmp_path_factory)


def test_remote_code_never_imported_and_snapshot_unchanged(hub, first_start):
    repo, state = hub
    assert not repo.marker.exists(), "a *_cognica_poe.py file of the repo was imported"
    assert snapshot_state(repo.snapshot) == state, "the hub snapshot was modified"
