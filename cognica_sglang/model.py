# Adapted from SGLang's python/sglang/srt/models/gemma2.py and llama.py (Apache-2.0): the same five
# classes, with the Cognica math taken from `cognica.layers`.
"""Cognica (nanochat GPT) on SGLang's radix/paged KV cache.

What differs from a Llama, and where it is handled (the math itself is in `cognica.layers`):
- rotary: nanochat rotates by -theta: SGLang's neox rotary with negated frequencies (`CognicaRotaryEmbedding`),
  so the weights load as published;
- per-head QK rms norm x 1.2 after rope, attention scale 1/sqrt(head_dim);
- per-layer windows: `RadixAttention(sliding_window_size=window_left)`, keys before the query;
- value embeddings (vocab-parallel tables) gated per KV head on alternating layers;
- smear of the previous token's normed embedding, with the previous token read from SGLang's
  KV slot bookkeeping (`cognica_sglang.smear`), exact under chunked prefill and radix hits;
- x0 residual lambdas, backout, relu^2 MLP, untied head, final soft-cap 15 (`final_logit_softcapping`);
- PoE stage modes (`--json-model-override-args '{"poe_exit_stage": k}'` / `'{"poe_head": "logop"}'`): only the
  layers of stages 1..k are built, loaded and given KV cache (`cognica.hf` sets num_hidden_layers); the exit tail
  and the Log-OP head are `layers.exit_tail` / `layers.logop_logits`, shared with the reference.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from sglang.srt.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.quantization.unquant import UnquantizedEmbeddingMethod, UnquantizedLinearMethod
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel, get_server_args
from sglang.srt.utils import add_prefix, is_cuda, make_layers
from torch import nn

from cognica import hf, layers
from cognica.checkpoint import canonical_name, expected_tensors, open_checkpoint, padded_vocab
from cognica.config import ARCHITECTURE_ALIASES, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig
from cognica_kernels import use_triton
from cognica_kernels.cpu_linear import UpcastLinear, min_rows, upcast_wanted
from cognica_sglang.attention import (
    cpu_decode_attention,
    triton_extend_attention,
    use_cpu_decode_attention,
    use_triton_attention,
)
from cognica_sglang.smear import SlotTokens, unsupported_modes

logger = logging.getLogger(__name__)
hf.register()  # the config class, also when loaded through SGLANG_EXTERNAL_MODEL_PACKAGE



def select_relu2() -> Callable[[torch.Tensor], torch.Tensor]:
    """relu^2 for the MLP: exactly `layers.relu2`, or the cognica_kernels Triton op on CUDA where COGNICA_KERNELS
    chooses it (cognica_kernels.dispatch)."""
    if use_triton("relu2", is_cuda(), logger):
        from cognica_kernels.relu2 import relu2  # imported only where Triton can run

        return relu2
    return layers.relu2


def window_left(cfg: CognicaConfig, layer_id: int, context_len: int) -> int:
    """RadixAttention's `sliding_window_size` (keys before the query; -1 = full): the L layers only
    slide when the served context is longer than the training context."""
    w = cfg.window_left[layer_id]
    return w if cfg.is_sliding[layer_id] or context_len > cfg.sequence_len else -1


def tp_shard(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """This rank's slice of a tensor laid out like a column-parallel output (the KV-head axis)."""
    tp = get_parallel()
    return t.chunk(tp.tp_size, dim=dim)[tp.tp_rank] if tp.tp_size > 1 else t


class CognicaRotaryEmbedding(RotaryEmbedding):
    """SGLang's neox rotary (its kernels and cache growth included) rotating by nanochat's -theta
    (`layers.nanochat_inv_freq`)."""

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return layers.nanochat_inv_freq(super()._compute_inv_freq(base))


class CognicaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(hidden_size, intermediate_size, bias=False, quant_config=quant_config,
                                         prefix=add_prefix("c_fc", prefix))
        self.c_proj = RowParallelLinear(intermediate_size, hidden_size, bias=False, quant_config=quant_config,
                                        prefix=add_prefix("c_proj", prefix))
        self.act_fn = select_relu2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.c_fc(x)
        x, _ = self.c_proj(self.act_fn(h))
        return x


class CognicaAttention(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_id: int, context_len: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        tp_size = get_parallel().tp_size
        if cfg.n_head % tp_size or cfg.n_kv_head % tp_size:
            raise ValueError(
                f"tensor parallel size {tp_size} must divide the {cfg.n_head} query and {cfg.n_kv_head} KV heads"
                " (the value-embedding gate is per KV head, so KV heads are not replicated)"
            )
        self.head_dim = cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.n_head // tp_size, cfg.n_kv_head // tp_size
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, bias=False,
                                          quant_config=quant_config, prefix=add_prefix("qkv_proj", prefix))
        self.c_proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False,
                                        quant_config=quant_config, prefix=add_prefix("c_proj", prefix))
        # one gate per KV head: its rows shard with the KV heads
        self.ve_gate = (
            ColumnParallelLinear(VE_GATE_CHANNELS, cfg.n_kv_head, bias=False, prefix=add_prefix("ve_gate", prefix))
            if layer_id in cfg.ve_layers else None
        )
        # built here, not through get_rope: get_rope shares one instance between models with the same arguments
        self.rotary_emb = CognicaRotaryEmbedding(cfg.head_dim, cfg.head_dim, max(context_len, 1), ROPE_BASE, True,
                                                 torch.get_default_dtype())
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim**-0.5,
                                   num_kv_heads=self.num_kv_heads, layer_id=layer_id,
                                   sliding_window_size=window_left(cfg, layer_id, context_len),
                                   quant_config=quant_config, prefix=add_prefix("attn", prefix))
        self.is_cuda = is_cuda()

    def forward(self, positions: torch.Tensor, h: torch.Tensor, ve: torch.Tensor | None,
                forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.ve_gate is not None:
            v = layers.add_value_embedding(v, h, ve, self.ve_gate.weight, self.num_kv_heads)
        q, k = self.rotary_emb(positions, q, k)
        q, k = layers.qk_norm(q.reshape(-1, self.num_heads, self.head_dim),
                              k.reshape(-1, self.num_kv_heads, self.head_dim))
        q, k, v = q.reshape(-1, self.q_size), k.reshape(-1, self.kv_size), v.contiguous()
        y = None
        if use_triton_attention(self.is_cuda, forward_batch):
            y = triton_extend_attention(q, k, v, self.attn, forward_batch)
        elif use_cpu_decode_attention(self.is_cuda, forward_batch):
            y = cpu_decode_attention(q, k, v, self.attn, forward_batch)
        if y is None:
            y = self.attn(q, k, v, forward_batch)
        out, _ = self.c_proj(y)
        return out


class CognicaDecoderLayer(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_id: int, context_len: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.attn = CognicaAttention(cfg, layer_id, context_len, quant_config, prefix=add_prefix("attn", prefix))
        self.mlp = CognicaMLP(cfg.n_embd, cfg.mlp_hidden, quant_config, prefix=add_prefix("mlp", prefix))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ve: torch.Tensor | None,
                forward_batch: ForwardBatch) -> torch.Tensor:
        x = x + self.attn(positions, layers.norm(x), ve, forward_batch)
        return x + self.mlp(layers.norm(x))


class CognicaModel(nn.Module):
    def __init__(self, cfg: CognicaConfig, context_len: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.cfg = cfg
        vocab = padded_vocab(cfg)
        self.wte = VocabParallelEmbedding(vocab, cfg.n_embd, prefix=add_prefix("wte", prefix))
        self.h = make_layers(
            cfg.n_active_layers,
            lambda idx, prefix: CognicaDecoderLayer(cfg, idx, context_len, quant_config, prefix=prefix),
            prefix=add_prefix("h", prefix),
        )
        self.value_embeds = nn.ModuleDict(
            {str(i): VocabParallelEmbedding(vocab, cfg.kv_dim, prefix=add_prefix(f"value_embeds.{i}", prefix))
             for i in cfg.ve_layers if i < cfg.n_active_layers}
        )
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.smear_gate = ReplicatedLinear(SMEAR_CHANNELS, 1, bias=False, prefix=add_prefix("smear_gate", prefix))
        self.smear_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.backout_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.slot_tokens = SlotTokens()
        # the layers whose residual stream is read out: every built stage end (Log-OP) or the last built layer
        self.exits = cfg.active_stage_ends if cfg.poe_head == "logop" else (cfg.n_active_layers - 1,)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """The normed input of lm_head; with the Log-OP head, the stage-end tails side by side [T, n_exits * d]."""
        cfg = self.cfg
        x = layers.norm(self.wte(input_ids))
        prev_ids, has_prev = self.slot_tokens.previous(input_ids, positions, forward_batch)
        x = layers.smear(x, layers.norm(self.wte(prev_ids)), self.smear_gate.weight, self.smear_lambda, has_prev)
        x0, x_backout, tails = x, None, []
        for i, layer in enumerate(self.h):
            x = layers.mix_residual(x, x0, self.resid_lambdas[i], self.x0_lambdas[i])
            ve = tp_shard(self.value_embeds[str(i)](input_ids)) if str(i) in self.value_embeds else None
            x = layer(positions, x, ve, forward_batch)
            if i == cfg.backout_layer:
                x_backout = x
            if i in self.exits:
                tails.append(layers.exit_tail(x, x_backout, self.backout_lambda, cfg.exit_backout(i)))
        if cfg.poe_head == "logop":
            return torch.cat(tails, dim=-1)  # LogOPHead normalises each stage itself
        return layers.norm(tails[0])


class CognicaPoEForCausalLM(nn.Module):
    # (param, checkpoint shard, shard id): the only renames; everything else keeps nanochat's names
    stacked_params_mapping = [(".qkv_proj.", ".c_q.", "q"), (".qkv_proj.", ".c_k.", "k"), (".qkv_proj.", ".c_v.", "v")]

    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.cfg = cfg = hf.cognica_config(config)
        args = get_server_args()
        refused = unsupported_modes(args)
        if refused:
            raise ValueError(
                "Cognica's smear reads the previous token from the KV slots this model's forwards wrote;"
                f" these settings fill KV slots another way and are not supported: {'; '.join(refused)}"
            )
        model_path = getattr(args, "model_path", None) or getattr(config, "_name_or_path", "")
        if model_path and Path(model_path).is_dir():
            open_checkpoint(model_path)  # a bad checkpoint fails here, with one message, before allocation
        context_len = getattr(args, "context_length", None) or cfg.sequence_len
        if context_len > cfg.sequence_len:
            # SGLang itself refuses this unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1
            # (sglang/srt/configs/model_config.py:1296-1316); past the training context the L layers would slide
            # and RoPE would see untrained positions, none of it tested.
            raise ValueError(f"cognica: --context-length {context_len} is longer than the {cfg.sequence_len}-token "
                             f"context the model was trained with; use --context-length {cfg.sequence_len} or less")
        self.quant_config = quant_config
        self.model = CognicaModel(cfg, context_len, quant_config, prefix=add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(padded_vocab(cfg), cfg.n_embd, quant_config=quant_config,
                                      prefix=add_prefix("lm_head", prefix))
        self.logits_processor = LogitsProcessor(config)  # soft-caps with config.final_logit_softcapping (15)
        # --is-embedding: the last token's normed final hidden state (lm_head's input), L2-normalised, as SGLang's
        # in-tree LlamaForCausalLM pools (Pooler(PoolingType.LAST, normalize=True), returned when get_embedding)
        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)
        self.logop_head: LogOPHead | None = None
        if cfg.poe_head == "logop":
            if get_parallel().tp_size > 1:
                raise ValueError("cognica: poe_head='logop' needs the whole vocabulary on one rank (log_softmax per"
                                 " stage); it is not supported with tensor parallelism")
            self.logop_head = LogOPHead(self.lm_head, cfg)
            # Log-OP returns log-probs, already soft-capped per stage: SGLang must not cap again
            # (LogitsProcessor reads final_logit_softcapping at construction: sglang/srt/layers/logits_processor.py:493)
            uncapped = copy.copy(config)
            uncapped.final_logit_softcapping = None
            self.logits_processor = LogitsProcessor(uncapped)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None, get_embedding: bool = False):
        if input_embeds is not None:
            raise NotImplementedError("Cognica needs token ids (smear, value embeddings); input_embeds is unsupported")
        hidden = self.model(input_ids, positions, forward_batch)
        if get_embedding:
            return self.pooler(hidden, forward_batch)
        return self.logits_processor(input_ids, hidden, self.logop_head or self.lm_head, forward_batch)

    def get_attention_sliding_window_size(self) -> int:
        return self.cfg.short_window  # keys before the query, the S layers' window (sizes the SWA pool)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        expected = {n: shape for n, shape in expected_tensors(self.cfg).items() if self.cfg.is_built(n)}
        seen: set[str] = set()
        unknown: list[str] = []
        for stored, w in weights:
            canon = canonical_name(stored)
            if canon not in expected:
                if canon not in ("cos", "sin") and self.cfg.is_built(canon):  # later stages' tensors: not built
                    unknown.append(stored)
                continue
            seen.add(canon)
            name = canon if canon.startswith("lm_head.") else "model." + canon.removeprefix("transformer.")
            for param_part, shard_part, shard_id in self.stacked_params_mapping:
                if shard_part in name:
                    param = params[name.replace(shard_part, param_part)]
                    param.weight_loader(param, w, shard_id)
                    break
            else:
                param = params[name]
                getattr(param, "weight_loader", default_weight_loader)(param, w)
        missing = sorted(set(expected) - seen)
        if missing or unknown:
            raise ValueError(f"cognica checkpoint: missing tensors {missing[:8]}, unexpected tensors {unknown[:8]}")
        self.post_load_weights()
        return set(params)

    def post_load_weights(self) -> None:
        """After loading (SGLang's dummy loaders call this directly): see `use_upcast_linear`."""
        use_upcast_linear(self)


class LogOPHead:
    """The Log-OP head as SGLang's logits processor sees an lm_head: it has the head's `weight` and a `quant_method`
    whose `apply` the processor calls (sglang/srt/layers/logits_processor.py:1156, `should_apply_lm_head_quant_method`
    is true for any method outside the unquantized names). `apply` splits the hidden row into the stage-end tails and
    returns `layers.logop_logits` over them, -inf on padded vocabulary rows. A plain object, not a module, so the
    model's parameters and state dict hold lm_head once."""

    def __init__(self, lm_head: ParallelLMHead, cfg: CognicaConfig):
        self.lm_head, self.n_embd, self.vocab_size = lm_head, cfg.n_embd, cfg.vocab_size
        self.quant_method = self

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head.quant_method.apply(self.lm_head, h, None)

    def apply(self, layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lp = layers.logop_logits(hidden.split(self.n_embd, dim=-1), self.project, self.vocab_size)
        pad = self.lm_head.weight.shape[0] - self.vocab_size
        return torch.nn.functional.pad(lp, (0, pad), value=float("-inf")) if pad > 0 else lp


class UpcastLinearMethod(UnquantizedLinearMethod):
    """SGLang's unquantized linear whose GEMM is `cognica_kernels.cpu_linear.UpcastLinear` (an fp32 weight copy
    used from a few rows on), for CPUs without bf16 matrix instructions."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.linear = UpcastLinear(weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return self.linear(x, None, bias)


def use_upcast_linear(model: nn.Module) -> int:
    """On a CPU without bf16 matmul (no AVX512-BF16/AMX), SGLang's bf16 linears and lm_head run torch's generic
    bf16 GEMM (~6x slower than fp32 MKL there): give them `UpcastLinearMethod`. AMX-packed layers are left alone.
    Called after every (re)load, so a copy always matches the loaded weight. Returns the number of layers."""
    switched, extra = 0, 0
    for module in model.modules():
        method, weight = getattr(module, "quant_method", None), getattr(module, "weight", None)
        if not isinstance(module, (LinearBase, ParallelLMHead)) or getattr(module, "use_intel_amx_backend", False):
            continue
        if type(method) not in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod, UpcastLinearMethod):
            continue
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not upcast_wanted(weight.dtype, weight.device):
            continue
        module.quant_method = UpcastLinearMethod(weight)
        switched += 1
        extra += module.quant_method.linear.extra_bytes
    if switched:
        logger.info("cognica: %d linear layers take fp32 weight copies from %d rows on (this CPU has no bf16 matmul "
                    "instructions; +%.2f GiB; COGNICA_CPU_LINEAR=off to disable)", switched, min_rows(), extra / 2**30)
    return switched


def _alias(name: str) -> type[CognicaPoEForCausalLM]:
    """The same model under another architecture string (SGLang keys its registry by class name)."""
    return type(name, (CognicaPoEForCausalLM,), {"__doc__": f"{name}: alias of CognicaPoEForCausalLM."})


EntryClass = [CognicaPoEForCausalLM] + [_alias(n) for n in ARCHITECTURE_ALIASES if n != "CognicaPoEForCausalLM"]
