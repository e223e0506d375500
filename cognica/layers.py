"""Every formula of the architecture that is not an engine building block, written once.

The reference model and both engine plugins call these; nothing here knows about an engine.
Shapes: `x` is [..., n_embd]; heads are [..., n_heads, head_dim].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from cognica.config import (
    LOGIT_SOFTCAP,
    QK_NORM_SCALE,
    ROPE_BASE,
    SMEAR_CHANNELS,
    VE_GATE_CHANNELS,
    VE_GATE_SCALE,
    CognicaConfig,
)

FP32_EPS = torch.finfo(torch.float32).eps  # nanochat's F.rms_norm default: opmath (fp32) epsilon, any dtype


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMS norm with no learned weight (nanochat `norm`)."""
    return F.rms_norm(x, (x.size(-1),), eps=FP32_EPS)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim // 2], computed in fp32 and cast like nanochat
    (it keeps them in the compute dtype, so a bf16 run rotates with bf16 cos/sin)."""
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
    inv_freq = 1.0 / (ROPE_BASE ** (channels / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary with nanochat's sign (a rotation by -theta, the opposite of neox):
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. `cos`/`sin` broadcast over the head axis."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


def nanochat_inv_freq(neox_inv_freq: torch.Tensor) -> torch.Tensor:
    """An engine's neox rotary rotates each half-split pair by +theta (y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin);
    nanochat by -theta (`apply_rotary`). With its inverse frequencies negated, the engine's cos/sin cache holds
    (cos, -sin) (cos is even, sin odd), so its own rotary op is exactly nanochat's, at run time, on the published
    c_q/c_k weights (which LoRA adapters and quantized checkpoints are made against)."""
    return -neox_inv_freq


def qk_norm(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head QK rms norm after rotary, times 1.2 each (nanochat)."""
    return norm(q) * QK_NORM_SCALE, norm(k) * QK_NORM_SCALE


def smear_gate_input(x: torch.Tensor) -> torch.Tensor:
    """The channels of the CURRENT token's normed embedding the smear gate reads."""
    return x[..., :SMEAR_CHANNELS]


def smear(
    x: torch.Tensor, x_prev: torch.Tensor, gate_weight: torch.Tensor, smear_lambda: torch.Tensor,
    has_prev: torch.Tensor | None = None,
) -> torch.Tensor:
    """x[t] += smear_lambda * sigmoid(smear_gate(x[t][:24])) * x[t-1].

    `x_prev` is the previous token's normed (pre-smear) embedding of the same sequence. `has_prev`
    (bool or 0/1, shape [..., 1]) zeroes the mix where there is no previous token (position 0).
    """
    gate = smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(smear_gate_input(x), gate_weight.to(x.dtype)))
    if has_prev is not None:
        gate = gate * has_prev.to(x.dtype)
    return x + gate * x_prev


def add_value_embedding(
    v: torch.Tensor, h: torch.Tensor, ve: torch.Tensor, ve_gate_weight: torch.Tensor, n_kv_head: int
) -> torch.Tensor:
    """v + 3 * sigmoid(ve_gate(h[..., :12])) * ve, one gate per KV head.

    `v`, `ve`: [..., n_kv_head * head_dim] (flat); `h` is the block's normed input.
    `ve_gate_weight` is [n_kv_head, 12] (or a tensor-parallel shard of its rows).
    """
    gate = VE_GATE_SCALE * torch.sigmoid(F.linear(h[..., :VE_GATE_CHANNELS], ve_gate_weight.to(h.dtype)))
    shape = v.shape
    v = v.view(*shape[:-1], n_kv_head, -1) + gate.unsqueeze(-1) * ve.view(*shape[:-1], n_kv_head, -1).to(v.dtype)
    return v.view(shape)


def mix_residual(
    x: torch.Tensor, x0: torch.Tensor, resid_lambda: torch.Tensor, x0_lambda: torch.Tensor
) -> torch.Tensor:
    """x = resid_lambdas[i] * x + x0_lambdas[i] * x0 at the top of every block."""
    return resid_lambda.to(x.dtype) * x + x0_lambda.to(x.dtype) * x0


def backout(x: torch.Tensor, x_backout: torch.Tensor, backout_lambda: torch.Tensor) -> torch.Tensor:
    """Subtract the mid-network residual before the final norm: x - backout_lambda * x_backout."""
    return x - backout_lambda.to(x.dtype) * x_backout


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)^2, the MLP activation (no gate)."""
    return F.relu(x).square()


def softcap(logits: torch.Tensor, cap: float = LOGIT_SOFTCAP) -> torch.Tensor:
    """15 * tanh(logits / 15) in fp32."""
    logits = logits.float()
    return cap * torch.tanh(logits / cap)


# ---- PoE stage exits (cognica.config: stage_ends, exit_backout) -----------------------------------------------


def exit_tail(x: torch.Tensor, x_backout: torch.Tensor | None, backout_lambda: torch.Tensor,
              subtract_backout: bool) -> torch.Tensor:
    """The residual stream an exit after layer e predicts from: x - backout_lambda * x_backout where
    `config.exit_backout(e)` (the exit comes after the backout block, like the final layer), else x unchanged."""
    if not subtract_backout:
        return x
    assert x_backout is not None, "an exit after the backout block needs x_backout"
    return backout(x, x_backout, backout_lambda)


def readout(tails: Sequence[torch.Tensor]) -> torch.Tensor:
    """The head's input: the normed tails of `config.readout_layers`, side by side ([..., n * n_embd]; one tail for
    the final head). Every engine's model returns this; `head_logits` reads it."""
    return norm(tails[0]) if len(tails) == 1 else torch.cat([norm(t) for t in tails], dim=-1)


# ---- the per-layer loop: residual mixing, backout capture, stage exits ----------------------------------------


class LoopWeights(Protocol):
    """The scalars the per-layer loop reads, under their nanochat names: every engine's model holds them."""

    resid_lambdas: torch.Tensor  # [n_layer]
    x0_lambdas: torch.Tensor  # [n_layer]
    backout_lambda: torch.Tensor  # [1]


class Streams(NamedTuple):
    """What `run_layers` hands on: the residual stream `x`, `x0` (the smeared embedding every block mixes back in),
    `x_backout` (the residual after block `backout_layer`, or what entered the run until then), and `hidden`,
    `readout` of the stage exits the run passed: None where it passed none (a pipeline stage before the last)."""

    x: torch.Tensor
    x0: torch.Tensor
    x_backout: torch.Tensor | None
    hidden: torch.Tensor | None


def run_layers(cfg: CognicaConfig, weights: LoopWeights, layer_ids: Iterable[int],
               run_block: Callable[[int, torch.Tensor], torch.Tensor], x: torch.Tensor, x0: torch.Tensor,
               x_backout: torch.Tensor | None) -> Streams:
    """The per-layer bookkeeping around `run_block(i, x) -> x` (block i, attention and MLP with their residuals):
    before block i, `mix_residual`; after it, the backout stream is kept at `cfg.backout_layer` and the stage exit
    (`exit_tail`) collected at each of `cfg.readout_layers`; at the end `readout` of those exits.

    `layer_ids` are the blocks this call runs, in order (all built layers, or one pipeline stage's start..end);
    `x`, `x0`, `x_backout` enter from the embedding (`x0` is `x`; `x_backout` None, or zeros where the streams
    must be tensors) or from the previous pipeline stage. A run must pass all of `cfg.readout_layers` or none
    (a Log-OP head split over pipeline stages would lose exits; the engines refuse it). Only Python ints steer
    the loop, so torch.compile (vLLM's `@support_torch_compile`) traces it without a graph break."""
    tails = []
    for i in layer_ids:
        x = mix_residual(x, x0, weights.resid_lambdas[i], weights.x0_lambdas[i])
        x = run_block(i, x)
        if i == cfg.backout_layer:
            x_backout = x
        if i in cfg.readout_layers:
            tails.append(exit_tail(x, x_backout, weights.backout_lambda, cfg.exit_backout(i)))
    if tails and len(tails) != len(cfg.readout_layers):
        raise ValueError(f"the layers run read out {len(tails)} of the head's {len(cfg.readout_layers)} stage exits "
                         f"{cfg.readout_layers}: a run must hold all of them or none")
    return Streams(x, x0, x_backout, readout(tails) if tails else None)


def head_logits(hidden: torch.Tensor, n_embd: int,
                stage_logits: Callable[[torch.Tensor], torch.Tensor | None]) -> torch.Tensor | None:
    """The head over `readout`'s output: `stage_logits` (lm_head, vocabulary cut and soft-cap: the reference's or
    an engine's logits processor) of the one tail; with several (the Log-OP head), their Log-OP combination.
    None passes through (an engine rank that holds no logits)."""
    if hidden.shape[-1] == n_embd:
        return stage_logits(hidden)
    stages = [stage_logits(h) for h in hidden.split(n_embd, dim=-1)]
    return None if stages[0] is None else logop_from_logits(stages)


def logop_from_logits(stage_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Log-OP combination: mean over stages of log_softmax(soft-capped stage logits), in fp32, returned as logits.
    Each term is a normalised log-probability; their mean is a log-linear pool (its exp sums to <= 1), which the
    consumer's softmax renormalises. It is already soft-capped: a consumer must not soft-cap it again."""
    total = torch.zeros_like(stage_logits[0], dtype=torch.float32)
    for logits in stage_logits:
        total += torch.log_softmax(logits.float(), dim=-1)
    return total / len(stage_logits)
