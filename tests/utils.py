"""The parity helpers the engine suites share live in the core (`cognica.parity`, also used by benchmarks/)."""

from cognica.parity import (  # noqa: F401
    FP32_LOGPROB_ATOL,
    SEED,
    Teacher,
    assert_bf16_close,
    assert_fp32_parity,
    assert_prompt_logprobs_parity,
    assert_token_count,
    bf16_tolerance,
    random_prompts,
    teacher_force,
)
