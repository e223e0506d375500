"""The server tests both engines pass, written once: the robustness tests of an OpenAI server on a tiny checkpoint
(`OpenAIServerTests`, for tests/vllm/test_server.py and tests/sglang/test_parity.py) and the first use of the model
card's server command on the Hub id (`FirstUseTests`, for tests/vllm/test_first_use.py and
tests/sglang/test_first_use.py).

Not a test module (pytest collects test_*.py, and only classes named Test*): a test module subclasses a class here as
`Test...`, saying how its engine is started, and the inherited tests are collected there, in that module's step
folder. Imports nothing of either engine, so both venvs import it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

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
from tests.server_utils import (
    BAD_REQUESTS,
    KV_ALLOCATION_LOG,
    Server,
    check_bad_request,
    check_kv_allocation_logged,
    check_short_soak,
    check_streaming_equals_non_streaming,
    check_survives_disconnect,
    free_port,
    serve,
)
from tests.utils import assert_fp32_parity

BOS_ID = 32759  # <|bos|>, also the eos of generation_config.json
CONVERTED = "cognica: converted"  # the one line a conversion logs (cognica.tokenizer.converted_tokenizer)


class OpenAIServerTests:
    """Bad requests, a disconnecting client, streaming and a short soak against the module's `server` fixture (one
    server start for the module); `engine` ("vllm" or "sglang") names the engine's KV-allocation log line."""

    engine: str

    def test_server_logs_its_kv_allocation(self, server: Server):
        """The marker whose absence the bad-checkpoint tests assert is what this server logged when it did start."""
        check_kv_allocation_logged(self.engine, server)

    def test_streaming_equals_non_streaming(self, server: Server):
        check_streaming_equals_non_streaming(server)

    @pytest.mark.parametrize("name,body,outcome", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
    def test_bad_request_gets_clear_answer_and_server_keeps_serving(self, server: Server, name, body, outcome):
        check_bad_request(server, name, body, outcome)

    def test_client_disconnect_mid_stream_leaves_server_serving(self, server: Server):
        check_survives_disconnect(server)

    def test_short_soak_every_answer_equals_the_request_alone(self, server: Server):
        check_short_soak(server)


def card_prompt_ids(repo: HubRepo) -> list[int]:
    """The card's prompt as the server must tokenize it: <|bos|> once, then tiktoken's ids from tokenizer.pkl."""
    return [BOS_ID, *load_tiktoken_pickle(repo.snapshot / "tokenizer.pkl").encode_ordinary(CARD_PROMPT)]


class FirstUseTests:
    """The card's server command on the Hub id, against an offline hub cache laid out exactly as downloaded
    (tokenizer.pkl, no tokenizer.json, remote code that marks any import), one start shared by the class.

    A subclass says how its engine serves: `engine` ("vllm" or "sglang"), `env` and `serve_kwargs` (for `serve`),
    `command(port)` (the card's command in its CPU form) and `card_greedy(server, prompt_ids, why)`: 8 greedy tokens
    of the card's prompt with their logprobs, asserting (message `why`) that the server's prompt ids are `prompt_ids`.
    """

    engine: str
    env: dict[str, str] = {}
    serve_kwargs: dict = {}

    @property
    def label(self) -> str:
        return {"vllm": "vLLM server", "sglang": "SGLang server"}[self.engine]

    @staticmethod
    def command(port: int) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def card_greedy(server: Server, prompt_ids: list[int], why: str) -> tuple[list[int], list[float]]:
        raise NotImplementedError

    def serve(self, env: dict[str, str], log: Path) -> AbstractContextManager[Server]:
        port = free_port()
        return serve(self.command(port), BP_REPO, port, log, {**self.env, **env}, **self.serve_kwargs)

    @pytest.fixture(scope="class")
    def hub(self, tmp_path_factory: pytest.TempPathFactory) -> tuple[HubRepo, dict]:
        return bp_hub(tmp_path_factory)

    @pytest.fixture(scope="class")
    def server(self, hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
        repo, _ = hub
        with self.serve(repo.env(), tmp_path_factory.mktemp("first_use") / "server.log") as s:
            yield s

    def test_card_curl_request_answers_with_bos_and_reference_greedy_tokens(self, hub, server):
        repo, _ = hub
        card = server.complete(prompt=CARD_PROMPT, max_tokens=16, temperature=0.5)  # the card's body, fewer tokens
        assert card.status_code == 200 and card.json()["choices"][0]["text"], f"card request failed: {card.text[:300]}"
        prompt_ids = card_prompt_ids(repo)
        tokens, logprobs = self.card_greedy(server, prompt_ids, "<|bos|> must be prepended once")
        assert_fp32_parity(load_reference(repo.snapshot, dtype=torch.float32), prompt_ids, tokens, logprobs,
                           f"{self.label} on the Hub id")

    def test_the_tokenizer_is_converted_once_across_the_server_processes(self, hub, server):
        repo, _ = hub
        lines = [x for x in server.log.read_text().splitlines() if CONVERTED in x]
        assert len(lines) == 1 and str(repo.snapshot / "tokenizer.pkl") in lines[0], \
            f"the first start must convert tokenizer.pkl exactly once (all of the {self.label}'s processes): {lines}"

    def test_damaged_cache_entry_is_replaced_and_the_served_ids_are_the_reference_s(self, hub, tmp_path):
        repo, _ = hub
        env, entry = damaged_cache(repo, tmp_path, "remapped")  # valid JSON, other ids: the silent damage
        prompt_ids, log = card_prompt_ids(repo), tmp_path / "server.log"
        with self.serve(env, log) as s:
            tokens, logprobs = self.card_greedy(s, prompt_ids, "the server tokenized with the damaged entry")
        assert_fp32_parity(load_reference(repo.snapshot, dtype=torch.float32), prompt_ids, tokens, logprobs,
                           f"{self.label} after a damaged cache entry")
        lines = [x for x in log.read_text().splitlines() if str(entry) in x]
        assert len(lines) == 1, f"one warning naming the damaged entry expected (all processes together): {lines}"

    def test_unwritable_cache_does_not_stop_the_server(self, hub, tmp_path):
        repo, _ = hub
        port = free_port()
        assert_server_answers_with_unwritable_cache(self.command(port), port, {**self.env, **repo.env()}, tmp_path,
                                                    **self.serve_kwargs)

    def test_hostile_tokenizer_pkl_stops_the_server_before_the_engine(self, tmp_path_factory):
        assert_server_refuses_hostile_pickle(self.command(free_port()), self.env, KV_ALLOCATION_LOG[self.engine],
                                             tmp_path_factory)

    def test_remote_code_never_imported_and_snapshot_unchanged(self, hub, server):
        """Collected after the class's other tests (a subclass that adds server starts binds it again after them)."""
        repo, state = hub
        assert not repo.marker.exists(), "a *_cognica_poe.py file of the repo was imported"
        assert snapshot_state(repo.snapshot) == state, "the hub snapshot was modified"

