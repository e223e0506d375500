"""Parity against the reference model: seeded prompts, teacher forcing and the tolerance rules.

One definition of "the same as the reference" for the engine tests, the benchmarks and the GPU check: float32
greedy tokens identical and per-token log-probs within `FP32_LOGPROB_ATOL`; bf16 within a tolerance calibrated per
prompt from the reference's own fp32-vs-bf16 drift, a differing greedy token only at a near tie. Each check raises
`AssertionError` with a message naming the step or position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cognica.model import CognicaGPT

SEED = 1234
FP32_LOGPROB_ATOL = 1e-3  # engine in float32 vs the fp32 reference: same math, different kernels


def random_prompts(lengths: list[int], seed: int = SEED, vocab: int = 32000) -> list[list[int]]:
    """Token-id prompts (no specials) of the given lengths, reproducible."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@dataclass
class Teacher:
    """The fp32 reference's view of prompt + generated tokens, computed in one full forward."""

    greedy: list[int]  # the reference's argmax at each generated position
    logprobs: list[float]  # log p(generated token) under the reference
    margins: list[float]  # logprob gap between the reference's top token and the generated one


@torch.inference_mode()
def teacher_force(ref: CognicaGPT, prompt: list[int], generated: list[int]) -> Teacher:
    ids = torch.tensor([prompt + generated])
    lp = torch.log_softmax(ref(ids)[0, len(prompt) - 1 : -1].float(), dim=-1)
    gen = torch.tensor(generated)
    chosen = lp.gather(1, gen[:, None])[:, 0]
    top = lp.max(dim=-1)
    return Teacher(top.indices.tolist(), chosen.tolist(), (top.values - chosen).tolist())


def assert_token_count(tokens: list[int], logprobs: list[float], n_new: int | None, what: str) -> None:
    """The engine generated what was asked (`n_new`, when given) with one logprob per token: the parity checks
    below zip the two lists, which would otherwise hide a short answer."""
    assert tokens, f"{what}: the engine generated no tokens"
    assert n_new is None or len(tokens) == n_new, f"{what}: asked for {n_new} tokens, got {len(tokens)}"
    assert len(logprobs) == len(tokens), f"{what}: {len(logprobs)} logprobs for {len(tokens)} tokens"


def assert_fp32_parity(ref: CognicaGPT, prompt: list[int], tokens: list[int], logprobs: list[float], what: str,
                       n_new: int | None = None) -> None:
    """Greedy tokens identical to the reference's and per-token logprobs within 1e-3."""
    assert_token_count(tokens, logprobs, n_new, what)
    t = teacher_force(ref, prompt, tokens)
    assert tokens == t.greedy, f"{what}: engine greedy tokens diverge from the reference at step " \
        f"{next(i for i, (a, b) in enumerate(zip(tokens, t.greedy)) if a != b)}"
    worst = max(abs(a - b) for a, b in zip(logprobs, t.logprobs))
    assert worst < FP32_LOGPROB_ATOL, f"{what}: logprob differs from the reference by {worst:.2e}"


def bf16_tolerance(ref32: CognicaGPT, ref16: CognicaGPT, prompt: list[int], n: int) -> float:
    """Calibrate: how far the reference itself moves a chosen token's logprob between fp32 and bf16 on this
    prompt (its own bf16 greedy continuation, teacher-forced through both), times 3, floor 0.05."""
    gen = ref16.generate([prompt], n)[0]
    a = teacher_force(ref32, prompt, gen).logprobs
    b = teacher_force(ref16, prompt, gen).logprobs
    return max(0.05, 3 * max(abs(x - y) for x, y in zip(a, b)))


def assert_bf16_close(ref32: CognicaGPT, prompt: list[int], tokens: list[int], logprobs: list[float], tol: float,
                      what: str, n_new: int | None = None) -> None:
    """bf16 engine vs fp32 reference: logprobs within the calibrated `tol`; a greedy token may differ from the
    reference's argmax only at a near tie: where the chosen token's reference logprob is within 2 * tol of the best
    (each of the two logprobs may be off by up to `tol`, in opposite directions)."""
    assert_token_count(tokens, logprobs, n_new, what)
    t = teacher_force(ref32, prompt, tokens)
    worst = max(abs(a - b) for a, b in zip(logprobs, t.logprobs))
    assert worst < tol, f"{what}: bf16 logprob off by {worst:.3f} (calibrated tolerance {tol:.3f})"
    for i, (tok, best, margin) in enumerate(zip(tokens, t.greedy, t.margins)):
        assert tok == best or margin < 2 * tol, \
            f"{what}: step {i} picked {tok}, reference {best} by margin {margin:.3f} (near-tie bound {2 * tol:.3f})"


def assert_prompt_logprobs_parity(ref: CognicaGPT, prompt: list[int], got: list[float], what: str,
                                  start: int = 1, chunk: int | None = None) -> None:
    """Per-position prompt log-probs: `got[i]` is the engine's log p(prompt[start + i] | prompt[:start + i]), for
    every position from `start` to the end of the prompt; each within FP32_LOGPROB_ATOL of the reference's
    full-sequence forward. The message names the worst position (and where it sits in its prefill chunk), which an
    aggregate such as bits per byte would average away."""
    want = ref.token_logprobs(prompt)[start - 1:]
    assert len(got) == len(want), f"{what}: {len(got)} prompt logprobs for positions {start}..{len(prompt) - 1}"
    errs = [abs(a - b) for a, b in zip(got, want)]
    worst = max(range(len(errs)), key=errs.__getitem__)
    where = f" (offset {(start + worst) % chunk} in its {chunk}-token chunk)" if chunk else ""
    assert errs[worst] < FP32_LOGPROB_ATOL, \
        f"{what}: prompt logprob at position {start + worst}{where} off by {errs[worst]:.2e}"
