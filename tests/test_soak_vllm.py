"""The long soak of the vLLM OpenAI server (not in the test command: `pytest -m slow`, about 10-20 minutes here).

200 requests, 16 concurrent, mixed lengths past the 512-key window, half streamed; every greedy answer must equal
the same request alone (float32, where batching does not change a greedy answer) and every request be answered.
The environment sets the size: SOAK_REQUESTS, SOAK_CONCURRENCY, SOAK_DTYPE, SOAK_MAX_TOKENS. The short soak of the
test command is `check_short_soak` in the server tests.
"""

from __future__ import annotations

import pytest

from tests.server_utils import long_soak

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_long_soak_every_request_answered_and_equal_to_the_request_alone(tmp_path):
    stats = long_soak("vllm", tmp_path)
    assert stats["failures"] == 0 and stats["answered"] == stats["requests"], stats
    assert stats["mismatches"] == 0, f"batched greedy answers differ from the same request alone: {stats}"
