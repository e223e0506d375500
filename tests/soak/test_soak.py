"""The long soak of an engine's OpenAI server (not in the test command: `pytest -m slow`, about 10-20 minutes here).

Run in the venv of the engine to soak: `.venv/vllm/bin/python -m pytest -s -m slow tests/soak/test_soak.py`, or with
SGLang's venv and environment
(`SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" .venv/sglang/bin/python ...`).
200 requests, 16 concurrent, mixed lengths past the 512-key window, half streamed; every greedy answer must equal
the same request alone (float32, where batching does not change a greedy answer) and every request be answered.
The environment sets the size: SOAK_REQUESTS, SOAK_CONCURRENCY, SOAK_DTYPE, SOAK_MAX_TOKENS. The short soak of the
test command is `check_short_soak` in the server tests.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.server_utils import long_soak

pytestmark = pytest.mark.slow  # a long soak: not in the test command

ENGINE = "vllm" if importlib.util.find_spec("vllm") else "sglang"  # each venv holds one engine


def test_long_soak_every_request_answered_and_equal_to_the_request_alone(tmp_path):
    stats = long_soak(ENGINE, tmp_path)
    assert stats["failures"] == 0 and stats["answered"] == stats["requests"], stats
    assert stats["mismatches"] == 0, f"batched greedy answers differ from the same request alone: {stats}"
