"""First use on SGLang: the card's `sglang.launch_server --model-path <id>` in its CPU form, against an offline hub
cache laid out exactly as downloaded (tokenizer.pkl, no tokenizer.json, remote code that marks any import); run in
.venv/sglang with SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)". The tests both
engines share are `FirstUseTests` in tests/launch_utils.py."""

from __future__ import annotations

import sys

from tests.hub_fixture import BP_REPO, CARD_PROMPT
from tests.launch_utils import FirstUseTests
from tests.server_utils import Server


class TestFirstUse(FirstUseTests):
    engine = "sglang"
    serve_kwargs = {"unset": ("SGLANG_EXTERNAL_MODEL_PACKAGE",), "startup_s": 400}

    @staticmethod
    def command(port: int) -> list[str]:
        """The card's `python3 -m sglang.launch_server --model-path "cognica/Cognica-BP-v1.0-1.3B-base"` in its CPU
        form (README), sized for the tests."""
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", BP_REPO, "--host", "127.0.0.1",
                "--port", str(port), "--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                "--skip-server-warmup", "--dtype", "float32", "--max-total-tokens", "4096"]

    @staticmethod
    def card_greedy(server: Server, prompt_ids: list[int], why: str) -> tuple[list[int], list[float]]:
        """A greedy completion returning its prompt's and its tokens' ids (choices[].token_ids:
        _build_completion_response)."""
        r = server.complete(prompt=CARD_PROMPT, max_tokens=8, temperature=0, logprobs=0, return_token_ids=True)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["prompt_token_ids"] == prompt_ids, f"{why}: {choice['prompt_token_ids']}"
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]
