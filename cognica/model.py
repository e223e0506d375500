"""The pure-torch reference Cognica model: the oracle of every engine test.

nanochat GPT as of a825e63 (see shared/spec/model.md). Notable, in forward order:
- the token embedding is rms-normed (no learned weight anywhere, eps = fp32 epsilon);
- smear: x[t] += smear_lambda * sigmoid(smear_gate(x[t][:24])) * x[t-1], same sequence, t >= 1;
- x0 residual: every block starts with x = resid_lambdas[i] * x + x0_lambdas[i] * x0;
- value embeddings on alternating layers (the last included): v += 3 sigmoid(ve_gate(h[:12])) * ve[ids];
- half-split rotary by -theta (nanochat sign), base 100000, then per-head QK rms norm x 1.2;
- causal attention with a per-layer window (a query sees itself and `window_left` keys before it);
- relu^2 MLP, no gate, no biases;
- backout: x -= backout_lambda * (residual after block n_layer // 2) before the final norm;
- untied lm_head, logits soft-capped at 15 in fp32.
PoE stage modes (config `poe_exit_stage`, `poe_head`): a stage prefix builds only layers 0..n_active_layers-1
and predicts through `layers.exit_tail` + the shared norm/head/soft-cap; the Log-OP head averages the stage-end
log-softmaxes (`layers.head_logits`). Parameter names are nanochat's, so a canonical state dict loads as is.
Padded batches (an `attention_mask`, left or right padding): a padded key is never attended, each row's rotary
positions start at its first real token and smear sees no token before it, so every row equals its prompt alone.
The module tree and forward live in `CognicaLayout`, which the transformers class (`cognica.hf`) shares.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from cognica import layers
from cognica.checkpoint import open_checkpoint
from cognica.config import SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig
from cognica.generation import KVCache, decode, sample
from cognica.names import padded_vocab


@dataclass(frozen=True)
class Span:
    """Where one forward's T tokens sit: their cache indices, the S = start + T key indices, and the rotary positions
    of both (equal to the indices unless the batch is padded; then [B, T] / [B, S], with `k_valid` [B, S])."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    k_valid: torch.Tensor | None = None

    def attention_mask(self, window_left: int) -> torch.Tensor:
        """Causal, windowed (a query sees itself and `window_left` positions before it), padded keys excluded:
        [T, S], or [B, 1, T, S] for a padded batch."""
        mask = (self.k_index[None, :] <= self.q_index[:, None]) & (
            self.q_pos[..., :, None] - self.k_pos[..., None, :] <= window_left)
        if self.k_valid is None:
            return mask
        # a padded query sees itself only: its output is never read, and a row with no key would give NaN
        return ((mask & self.k_valid[:, None, :]) | (self.q_index[:, None] == self.k_index[None, :]))[:, None]


def token_span(idx: torch.Tensor, start: int, attention_mask: torch.Tensor | None,
               cache: KVCache | None) -> Span:
    """The `Span` of `idx` [B, T] after `start` cached tokens; with a padding mask (this call's or the cache's),
    a row's positions count its real tokens only (so a left-padded row starts at 0 like its prompt alone)."""
    B, T = idx.shape
    q_index = torch.arange(start, start + T, device=idx.device)
    k_index = torch.arange(start + T, device=idx.device)
    cached = None if cache is None else cache.key_valid
    if attention_mask is None and cached is None:
        return Span(q_index, k_index, q_index, k_index)
    real = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.to(idx.device).bool()
    if cached is None:
        cached = torch.ones(B, start, dtype=torch.bool, device=idx.device)
    valid = torch.cat([cached, real], dim=1)
    pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
    return Span(q_index, k_index, pos[:, -T:], pos, valid)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]
"""`attend(q, k, v, layer_idx, window_left) -> y`: the attention of one block, replaceable as nanochat's
`flash_attention.py` swaps its implementation (the reference's `sdpa_attend`; benchmarks/paged_decode.py's paged
Triton kernel). q [..., T, n_head, head_dim], k and v [..., T, n_kv_head, head_dim] are this call's tokens, rotary
and QK norm applied; y is [..., T, n_head, head_dim]. It owns the KV cache: it stores k/v and attends over the
cached keys and these, causally within `window_left` keys before each query, with scale head_dim^-0.5."""


def sdpa_attend(cache: KVCache | None, span: Span) -> Attend:
    """The reference's attention over [B, T, ...] tokens: torch SDPA with `span`'s mask, the keys and values
    appended to `cache` (`KVCache`: [B, H, S, D] per layer) when there is one."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, window_left: int) -> torch.Tensor:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            if cache.k[layer_idx] is not None:
                k = torch.cat([cache.k[layer_idx], k], dim=2)
                v = torch.cat([cache.v[layer_idx], v], dim=2)
            cache.k[layer_idx], cache.v[layer_idx] = k, v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=span.attention_mask(window_left),
                                           scale=q.shape[-1]**-0.5, enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2)

    return attend


class CognicaAttention(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.layer_idx, self.window_left = layer_idx, cfg.window_left[layer_idx]
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.kv_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.ve_gate = Gate(VE_GATE_CHANNELS, cfg.n_kv_head) if layer_idx in cfg.ve_layers else None

    def forward(self, h, ve, cos, sin, attend: Attend):
        """h [..., T, n_embd] (the block's normed input); cos/sin broadcast over the heads ([..., T, 1, head_dim/2])."""
        q = self.c_q(h).unflatten(-1, (self.n_head, self.head_dim))
        k = self.c_k(h).unflatten(-1, (self.n_kv_head, self.head_dim))
        v = self.c_v(h)
        if ve is not None:
            v = layers.add_value_embedding(v, h, ve, self.ve_gate.weight, self.n_kv_head)
        v = v.unflatten(-1, (self.n_kv_head, self.head_dim))
        q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
        q, k = layers.qk_norm(q, k)
        return self.c_proj(attend(q, k, v, self.layer_idx, self.window_left).flatten(-2))


class CognicaMLP(nn.Module):
    def __init__(self, cfg: CognicaConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x, act: Callable[[torch.Tensor], torch.Tensor] = layers.relu2):
        """`act` is relu^2 (`layers.relu2`), replaceable by a kernel of the same formula."""
        return self.c_proj(act(self.c_fc(x)))


class CognicaBlock(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn = CognicaAttention(cfg, layer_idx)
        self.mlp = CognicaMLP(cfg)

    def forward(self, x, ve, cos, sin, attend: Attend, act: Callable[[torch.Tensor], torch.Tensor] = layers.relu2):
        x = x + self.attn(layers.norm(x), ve, cos, sin, attend)
        return x + self.mlp(layers.norm(x), act)


class Gate(nn.Module):
    """A bias-free gate projection ([out, in] `weight`, as nanochat's nn.Linear stores it) that is not an nn.Linear:
    quantizers (`targets="Linear"`) and PEFT's `all-linear` leave it alone, as the engines serve it (a plain
    parameter, `cognica.weights`). `layers.smear` / `layers.add_value_embedding` apply it."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))


class CognicaLayout:
    """nanochat's module tree, whose parameter names are the published tensor names, and its forward; mixed into
    `CognicaGPT` and the transformers class (`cognica.hf`), so both hold exactly the published state dict."""

    arch: CognicaConfig

    def _build(self, cfg: CognicaConfig) -> None:
        self.arch = cfg
        v = padded_vocab(cfg)
        self.transformer = nn.ModuleDict(
            {"wte": nn.Embedding(v, cfg.n_embd),
             "h": nn.ModuleList(CognicaBlock(cfg, i) for i in range(cfg.n_active_layers))}
        )
        self.lm_head = nn.Linear(cfg.n_embd, v, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(cfg.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(cfg.n_layer))
        self.smear_gate = Gate(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict(
            {str(i): nn.Embedding(v, cfg.kv_dim) for i in cfg.ve_layers if i < cfg.n_active_layers}
        )

    def forward_logits(self, idx: torch.Tensor, cache: KVCache | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx [B, T] -> fp32 soft-capped logits [B, T, vocab_size] (Log-OP head: normalised log-probs).
        With a cache, idx continues it. `attention_mask` [B, T] (1 = token, 0 = padding) covers this call's tokens."""
        cfg, dtype = self.arch, self.lm_head.weight.dtype
        start = 0 if cache is None else cache.pos
        span = token_span(idx, start, attention_mask, cache)
        cos, sin = layers.rotary_cos_sin(span.q_pos, cfg.head_dim, dtype)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # over the heads

        x = layers.norm(self.transformer.wte(idx).to(dtype))
        # smear: mix in the previous token's normed embedding; a row's first real token has none
        B = idx.shape[0]
        prev = x.new_zeros(B, 1, cfg.n_embd) if cache is None or cache.prev_embedding is None else cache.prev_embedding
        has_prev = span.q_pos > 0
        if span.k_valid is not None:
            has_prev = has_prev & span.k_valid[:, -idx.shape[1]:]
        x_prev = torch.cat([prev, x[:, :-1]], dim=1)
        if cache is not None:
            cache.prev_embedding = x[:, -1:]
            cache.key_valid = span.k_valid
        x = layers.smear(x, x_prev, self.smear_gate.weight, self.smear_lambda, has_prev[..., None])

        checkpointing = self.training and getattr(self, "gradient_checkpointing", False)
        attend = sdpa_attend(cache, span)

        def run_block(i: int, x: torch.Tensor) -> torch.Tensor:
            block = self.transformer.h[i]
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            if checkpointing:  # set by transformers' gradient_checkpointing_enable (the transformers class only)
                return self._gradient_checkpointing_func(block.__call__, x, ve, cos, sin, attend)
            return block(x, ve, cos, sin, attend)

        hidden = layers.run_layers(cfg, self, range(len(self.transformer.h)), run_block, x, x0=x, x_backout=None).hidden
        if cache is not None:
            cache.pos += idx.shape[1]
        return layers.head_logits(hidden, cfg.n_embd, lambda h: layers.softcap(self.lm_head(h)[..., :cfg.vocab_size]))


class CognicaGPT(CognicaLayout, nn.Module):
    def __init__(self, cfg: CognicaConfig):
        super().__init__()
        self.config = cfg
        self._build(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_logits(idx, cache, attention_mask)

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
        seed: int = 0, stop_ids: tuple[int, ...] = (),
    ) -> list[list[int]]:
        """KV-cache generation. Prompts of equal length run as one batch; others one by one."""
        if len({len(p) for p in prompts}) > 1:
            return [self.generate([p], max_new_tokens, temperature, top_k, seed, stop_ids)[0] for p in prompts]
        if not prompts or not prompts[0]:
            raise ValueError("generate needs at least one non-empty prompt")
        gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        ids = decode(self, torch.tensor(prompts), max_new_tokens, lambda _, logits: sample(logits, temperature, top_k,
                     gen), torch.tensor(stop_ids, dtype=torch.long), pad=0)
        out = []
        for row in ids[:, len(prompts[0]):].tolist():
            stop = next((j for j, t in enumerate(row) if t in stop_ids), None)
            out.append(row if stop is None else row[:stop + 1])
        return out

    @torch.inference_mode()
    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) for t >= 1 from one full-sequence forward."""
        x = torch.tensor([ids], device=self.lm_head.weight.device)
        lp = torch.log_softmax(self(x)[0, :-1], dim=-1)
        return lp.gather(1, x[0, 1:, None])[:, 0].tolist()


def load_reference(
    model_dir: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str = "cpu", progress: bool = False,
    poe_exit_stage: int | None = None, poe_head: str | None = None, poe_force: bool | None = None,
) -> CognicaGPT:
    """Validate a checkpoint directory and load it into the reference model in `dtype`.

    The PoE keywords override config.json (None keeps its value): `poe_exit_stage=k` builds and loads only the
    layers of stages 1..k, `poe_head="logop"` selects the Log-OP head; both are refused on a poe_mode="none"
    checkpoint unless `poe_force=True` (ConfigError)."""
    ckpt = open_checkpoint(model_dir)
    overrides = {k: v for k, v in (("poe_exit_stage", poe_exit_stage), ("poe_head", poe_head),
                                   ("poe_force", poe_force)) if v is not None}
    cfg = replace(ckpt.config, **overrides) if overrides else ckpt.config
    with torch.device("meta"):
        model = CognicaGPT(cfg)
    model = model.to_empty(device=device).to(dtype)
    # a stage prefix reads only the tensors it builds
    model.load_state_dict(ckpt.state_dict(dtype, progress, keep=cfg.is_built), strict=True)
    return model.eval()
