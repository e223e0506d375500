"""`cognica.layers.run_layers`, the per-layer loop of the reference, both plugins and the paged harness: residual
mixing before each block, the backout stream after `backout_layer`, the stage exits of `readout_layers`, a run split
over pipeline stages, the all-or-none rule for exits, and a trace by torch.compile without graph breaks (vLLM's
`@support_torch_compile` traces the plugin's forward around it)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from cognica import layers
from cognica.factory import PRESETS

N_LAYER, N_EMBD = 4, 64  # backout after layer 2; 2-layer stages end after layers 1 and 3


def _cfg(head: str):
    return replace(PRESETS["tiny"], n_layer=N_LAYER, n_head=1, n_kv_head=1, n_embd=N_EMBD, poe_mode="flat",
                   poe_every=2, poe_head=head)  # fmt: skip


def _weights() -> SimpleNamespace:
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(resid_lambdas=torch.rand(N_LAYER, generator=g) + 0.5,
                           x0_lambdas=torch.rand(N_LAYER, generator=g), backout_lambda=torch.tensor([0.3]))  # fmt: skip


def _block(i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x * (i + 2)) + i


def _by_hand(cfg, w, x: torch.Tensor) -> torch.Tensor:
    """The loop written out for the 4-layer config: mix, block, backout after layer 2, exits after 1 and 3."""
    x0, streams = x, []
    for i in range(N_LAYER):
        x = _block(i, w.resid_lambdas[i] * x + w.x0_lambdas[i] * x0)
        streams.append(x)
    final = streams[3] - w.backout_lambda * streams[2]
    if cfg.poe_head == "final":
        return layers.norm(final)
    return torch.cat([layers.norm(streams[1]), layers.norm(final)], dim=-1)  # the exit after 1 precedes the backout


@pytest.mark.parametrize("head", ["final", "logop"])
def test_run_layers_is_the_loop_written_out(head):
    cfg, w = _cfg(head), _weights()
    assert cfg.backout_layer == 2 and cfg.readout_layers == ((3,) if head == "final" else (1, 3))
    x = torch.randn(3, N_EMBD, generator=torch.Generator().manual_seed(1))
    out = layers.run_layers(cfg, w, range(N_LAYER), _block, x, x0=x, x_backout=None)
    torch.testing.assert_close(out.hidden, _by_hand(cfg, w, x), rtol=0, atol=0)
    assert out.x0 is x, "x0 passes through unchanged"
    assert out.x_backout is not None and out.hidden.shape[-1] == N_EMBD * len(cfg.readout_layers)


def test_a_run_split_over_pipeline_stages_equals_one_run():
    """vLLM's pipeline parallelism: the first stage starts x_backout as zeros and hands x, x0, x_backout on."""
    cfg, w = _cfg("final"), _weights()
    x = torch.randn(3, N_EMBD, generator=torch.Generator().manual_seed(2))
    whole = layers.run_layers(cfg, w, range(N_LAYER), _block, x, x, torch.zeros_like(x))
    for cut in range(1, N_LAYER):
        first = layers.run_layers(cfg, w, range(cut), _block, x, x, torch.zeros_like(x))
        assert first.hidden is None, "a stage before the exit reads nothing out"
        last = layers.run_layers(cfg, w, range(cut, N_LAYER), _block, first.x, first.x0, first.x_backout)
        torch.testing.assert_close(last.hidden, whole.hidden, rtol=0, atol=0)


def test_a_run_with_some_of_the_head_exits_is_refused():
    cfg, w = _cfg("logop"), _weights()
    x = torch.randn(3, N_EMBD)
    with pytest.raises(ValueError, match="all of them or none"):
        layers.run_layers(cfg, w, range(2), _block, x, x, torch.zeros_like(x))


def test_run_layers_traces_into_one_graph():
    """torch.compile(fullgraph=True) fails on a graph break: nothing data-dependent steers the loop."""
    cfg, w = _cfg("logop"), _weights()
    x = torch.randn(3, N_EMBD, generator=torch.Generator().manual_seed(3))

    def forward(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        def run_block(i: int, h: torch.Tensor) -> torch.Tensor:  # a closure, as every caller writes it
            return _block(i, h) * scale

        return layers.run_layers(cfg, w, range(N_LAYER), run_block, x, x, torch.zeros_like(x)).hidden

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, torch.tensor(1.0)), _by_hand(cfg, w, x), rtol=0, atol=0)
