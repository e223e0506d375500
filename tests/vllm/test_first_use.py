"""First use on vLLM: the card's CPU-form command on the Hub id, against an offline hub cache laid out exactly as
downloaded (tokenizer.pkl, no tokenizer.json, remote code that marks any import); run in .venv/vllm. The tests both
engines share are `FirstUseTests` in tests/launch_utils.py."""

from __future__ import annotations

import sys
from pathlib import Path

import requests

from tests.hub_fixture import BP_REPO, CARD_PROMPT
from tests.launch_utils import CONVERTED, FirstUseTests
from tests.server_utils import Server


class TestFirstUse(FirstUseTests):
    engine = "vllm"
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}

    @staticmethod
    def command(port: int) -> list[str]:
        """The card's `vllm serve "cognica/Cognica-BP-v1.0-1.3B-base"` in its CPU form (README), sized for the
        tests."""
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", BP_REPO, "--host",
                "127.0.0.1", "--port", str(port), "--max-model-len", "1024", "--dtype", "float32", "--enforce-eager",
                "--max-num-seqs", "4"]

    @staticmethod
    def card_greedy(server: Server, prompt_ids: list[int], why: str) -> tuple[list[int], list[float]]:
        """The ids /tokenize gives the card's prompt, then a greedy completion with its tokens as token ids."""
        served = requests.post(f"{server.url}/tokenize", json={"model": BP_REPO, "prompt": CARD_PROMPT}, timeout=60)
        assert served.status_code == 200 and served.json()["tokens"] == prompt_ids, f"{why}: {served.text[:300]}"
        r = server.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0,
                            return_tokens_as_token_ids=True)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(prompt_ids), f"{why}: {r.json()['usage']}"
        lp = r.json()["choices"][0]["logprobs"]
        return [int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]

    def test_second_start_does_not_convert_again(self, hub, server, tmp_path):
        repo, _ = hub
        cache = Path(repo.env()["COGNICA_CACHE_DIR"]) / "tokenizers"
        before = {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")}
        assert before, "the first start left no converted tokenizer in the cache"
        log = tmp_path / "second.log"
        with self.serve(repo.env(), log) as second:
            r = second.complete(prompt=CARD_PROMPT, max_tokens=2, temperature=0)
            assert r.status_code == 200, r.text
        assert CONVERTED not in log.read_text(), "the second start converted tokenizer.pkl again"
        assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*/tokenizer.json")} == before, "cache was rewritten"

    # last again, after the second start
    test_remote_code_never_imported_and_snapshot_unchanged = \
        FirstUseTests.test_remote_code_never_imported_and_snapshot_unchanged
