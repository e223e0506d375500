# Adapted from SGLang's python/sglang/srt/models/gemma2.py and llama.py (Apache-2.0); cognica_vllm/model.py is its
# mirror, class for class and name for name, so a diff of the two shows only what differs between the engines.
"""Cognica-BP/PoE-v1.0-1.3B-base (nanochat GPT) on SGLang's radix/paged KV cache.

What differs from a Llama, and where it is handled (the math itself is in `cognica.layers`):
- rotary: nanochat rotates by -theta: SGLang's neox rotary with negated frequencies (`CognicaRotaryEmbedding`),
  so the weights load as published (`cognica.weights`);
- per-head QK rms norm x 1.2 after rope, attention scale 1/sqrt(head_dim);
- per-layer windows: `RadixAttention(sliding_window_size=window_left)`, keys before the query;
- value embeddings (vocab-parallel tables) gated per KV head on alternating layers;
- smear of the previous token's normed embedding, with the previous token read from SGLang's KV slot bookkeeping
  (`cognica_sglang.smear`), exact under chunked prefill and radix hits;
- x0 residual lambdas, backout, relu^2 MLP, untied head, final soft-cap 15 (`final_logit_softcapping`);
- PoE stage modes (`--json-model-override-args '{"poe_exit_stage": k}'` / `'{"poe_head": "logop"}'`): only the
  layers of stages 1..k are built, loaded and given KV cache (`cognica.hf` sets num_hidden_layers); the head reads
  `cfg.readout_layers` (`layers.readout`) and combines them with `layers.head_logits`, shared with the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding.base import RotaryEmbedding
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import attention_backends, get_parallel, get_server_args
from sglang.srt.utils import add_prefix, is_cuda, make_layers
from torch import nn

from cognica import hf, layers
from cognica.config import ARCHITECTURE_ALIASES, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig
from cognica.names import padded_vocab
from cognica.serving import ServingSettings, check_before_build, refuse
from cognica.weights import engine_weights, load_parameters
from cognica_kernels.dispatch import relu2_activation
from cognica_sglang.attention import (
    check_attention_backends,
    cpu_decode_attention,
    engine_window_size,
    sliding_window_size,
    triton_extend_attention,
    use_cpu_decode_attention,
    use_triton_attention,
)
from cognica_sglang.cpu_linear import use_upcast_linear
from cognica_sglang.lora import CognicaLoRAMixin
from cognica_sglang.smear import SlotTokens

logger = logging.getLogger(__name__)
hf.register()  # the config class, also when loaded through SGLANG_EXTERNAL_MODEL_PACKAGE


def tp_rank_and_size() -> tuple[int, int]:
    tp = get_parallel()
    return tp.tp_rank, tp.tp_size


class CognicaRotaryEmbedding(RotaryEmbedding):
    """SGLang's neox rotary (its kernels and cache growth included) rotating by nanochat's -theta
    (`layers.nanochat_inv_freq`)."""

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return layers.nanochat_inv_freq(super()._compute_inv_freq(base))


class CognicaMLP(nn.Module):
    def __init__(self, cfg: CognicaConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.n_embd, cfg.mlp_hidden, bias=False, quant_config=quant_config,
                                         prefix=add_prefix("c_fc", prefix))
        self.c_proj = RowParallelLinear(cfg.mlp_hidden, cfg.n_embd, bias=False, quant_config=quant_config,
                                        prefix=add_prefix("c_proj", prefix))
        self.act_fn = relu2_activation(is_cuda(), logger)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.c_fc(x)
        x, _ = self.c_proj(self.act_fn(h))
        return x


class CognicaAttention(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_id: int, context_len: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()  # refused unless it shards the heads: `cognica.serving.refusals`
        self.head_dim = cfg.head_dim
        self.kv_heads = cfg.local_kv_heads(tp_size, tp_rank)  # SGLang replicates KV heads when tp > n_kv_head
        self.num_heads, self.num_kv_heads = cfg.n_head // tp_size, len(self.kv_heads)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, bias=False,
                                          quant_config=quant_config, prefix=add_prefix("qkv_proj", prefix))
        self.c_proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False,
                                        quant_config=quant_config, prefix=add_prefix("c_proj", prefix))
        # [n_kv_head, 12], whole on every rank; a rank gates its own KV heads' rows
        self.ve_gate = (nn.Parameter(torch.empty(cfg.n_kv_head, VE_GATE_CHANNELS), requires_grad=False)
                        if layer_id in cfg.ve_layers else None)
        # built here, not through get_rope: get_rope shares one instance between models with the same arguments
        self.rotary_emb = CognicaRotaryEmbedding(cfg.head_dim, cfg.head_dim, context_len, ROPE_BASE, True,
                                                 torch.get_default_dtype())
        # `cognica.serving.served_window_left` as SGLang counts it: keys before the query, -1 = full
        self.window_left = sliding_window_size(cfg, layer_id, context_len)
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim**-0.5,
                                   num_kv_heads=self.num_kv_heads, layer_id=layer_id,
                                   sliding_window_size=self.window_left,
                                   quant_config=quant_config, prefix=add_prefix("attn", prefix))
        self.is_cuda = is_cuda()

    def forward(self, positions: torch.Tensor, h: torch.Tensor, ve: torch.Tensor | None,
                forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.ve_gate is not None:
            gate = self.ve_gate[self.kv_heads.start:self.kv_heads.stop]
            v = layers.add_value_embedding(v, h, ve, gate, self.num_kv_heads)
        q, k = self.rotary_emb(positions, q, k)
        q, k = layers.qk_norm(q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim)))
        q, k, v = q.flatten(-2), k.flatten(-2), v.contiguous()
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
        self.mlp = CognicaMLP(cfg, quant_config, prefix=add_prefix("mlp", prefix))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ve: torch.Tensor | None,
                forward_batch: ForwardBatch) -> torch.Tensor:
        x = x + self.attn(positions, layers.norm(x), ve, forward_batch)
        return x + self.mlp(layers.norm(x))


class CognicaModel(nn.Module):
    def __init__(self, cfg: CognicaConfig, context_len: int, quant_config: QuantizationConfig | None = None,
                 prefix: str = "") -> None:
        super().__init__()
        self.config = cfg
        vocab = padded_vocab(cfg)
        self.wte = VocabParallelEmbedding(vocab, cfg.n_embd, prefix=add_prefix("wte", prefix))
        # Not named `layers`: SGLang captures prefill CUDA graphs (breakable ones by default on CUDA) only for a model
        # with a `layers` attribute (`capture_prefill_graph` in model_runner_components/cuda_graph_setup.py), and
        # the smear's slot bookkeeping has not been verified inside a captured prefill; prefill runs eagerly, decode
        # CUDA graphs are unaffected. The checkpoint names (`cognica.weights`) say `layers` all the same.
        self.eager_prefill_layers = make_layers(
            cfg.n_active_layers,
            lambda idx, prefix: CognicaDecoderLayer(cfg, idx, context_len, quant_config, prefix=prefix),
            prefix=add_prefix("layers", prefix),
        )
        self.value_embeds = nn.ModuleDict(
            {str(i): VocabParallelEmbedding(vocab, cfg.kv_dim, prefix=add_prefix(f"value_embeds.{i}", prefix))
             for i in cfg.ve_layers if i < cfg.n_active_layers}
        )
        kv_heads = cfg.local_kv_heads(*reversed(tp_rank_and_size()))
        self.kv_slice = slice(kv_heads.start * cfg.head_dim, kv_heads.stop * cfg.head_dim)  # this rank's ve columns
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.smear_gate = nn.Parameter(torch.empty(1, SMEAR_CHANNELS), requires_grad=False)
        self.smear_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.backout_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.smear_tokens = SlotTokens()

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return layers.norm(self.wte(input_ids))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """The head's input (`layers.readout`)."""
        cfg = self.config
        x = self.embed_input_ids(input_ids)
        prev_ids, has_prev = self.smear_tokens.previous(input_ids, positions, forward_batch)
        x = layers.smear(x, self.embed_input_ids(prev_ids), self.smear_gate, self.smear_lambda, has_prev)
        x0, x_backout = x, torch.zeros_like(x)

        def run_block(i: int, x: torch.Tensor) -> torch.Tensor:  # layer i (`make_layers` with no pp_rank builds all)
            ve = self.value_embeds[str(i)](input_ids)[..., self.kv_slice] if str(i) in self.value_embeds else None
            return self.eager_prefill_layers[i](positions, x, ve, forward_batch)

        streams = layers.run_layers(cfg, self, range(len(self.eager_prefill_layers)), run_block, x, x0, x_backout)
        return streams.hidden


class CognicaPoEForCausalLM(CognicaLoRAMixin, nn.Module):
    def __init__(self, config, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        # the HF config, not the CognicaConfig (`self.cfg`, vLLM's model's `config`): SGLang's LoRA pool reads it
        # off the model (`LoRAMemoryPool._get_num_experts`, `init_buffers` in sglang/srt/lora/mem_pool.py)
        self.config = config
        self.cfg = cfg = hf.cognica_config(config)
        args = get_server_args()
        context_len = getattr(args, "context_length", None) or cfg.sequence_len
        model_path = getattr(args, "model_path", None) or getattr(config, "_name_or_path", "")
        # the checkpoint and the served context before anything reads SGLang's runtime context (backends, parallel
        # state); the parallel rules again (the first process refused the same, `cognica_sglang.config_checks`), as
        # this process's context has them
        check_before_build(cfg, model_path, ServingSettings(context_len=context_len, context_flag="--context-length"))
        check_attention_backends(attention_backends())  # as resolved (the first process checked what the user named)
        tp_size = tp_rank_and_size()[1]
        refuse(cfg, ServingSettings(tensor_parallel=tp_size, head_on_vocab_shard=tp_size > 1))
        # config.json's (the HF config keeps it); SGLang built quant_config from it, which every linear layer receives
        self.quantization_config = getattr(config, "quantization_config", None)
        self.model = CognicaModel(cfg, context_len, quant_config, prefix=add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(padded_vocab(cfg), cfg.n_embd, quant_config=quant_config,
                                      prefix=add_prefix("lm_head", prefix))
        if cfg.poe_head == "logop":
            self.head: ParallelLMHead | LogOPHead = LogOPHead(self.lm_head, cfg)
            self.logits_processor: LogitsProcessor = LogOPLogitsProcessor(config)
        else:
            self.head = self.lm_head
            self.logits_processor = LogitsProcessor(config)  # soft-caps with config.final_logit_softcapping (15)
        # --is-embedding: the last token's normed final hidden state (lm_head's input), L2-normalised, as SGLang's
        # in-tree LlamaForCausalLM pools (Pooler(PoolingType.LAST, normalize=True), returned when get_embedding)
        self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None, get_embedding: bool = False):
        if input_embeds is not None:
            raise NotImplementedError("Cognica needs token ids (smear, value embeddings); input_embeds is unsupported")
        hidden_states = self.model(input_ids, positions, forward_batch)
        if get_embedding:
            return self.pooler(hidden_states, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.head, forward_batch)

    def get_attention_sliding_window_size(self) -> int:
        # the S layers' window as SGLang's backends read it (sizes the SWA pool and its eviction): the keys before the
        # query, one more where the decode backend counts the query among them (cognica_sglang.attention)
        return engine_window_size(self.cfg.short_window)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # `cognica.weights` names say `layers` where this module says `eager_prefill_layers` (see CognicaModel)
        params = {n.replace(".eager_prefill_layers.", ".layers.", 1): (n, p) for n, p in self.named_parameters()}
        weights = engine_weights(self.cfg, weights, self.quantization_config)
        loaded = load_parameters({n: p for n, (_, p) in params.items()}, weights, default_weight_loader)
        self.post_load_weights()
        return {params[n][0] for n in loaded}

    def post_load_weights(self) -> None:
        """After loading (SGLang's dummy loaders call this directly): `cognica_sglang.cpu_linear`."""
        use_upcast_linear(self)


class LogOPLogitsProcessor(LogitsProcessor):
    """SGLang's logits processor for the Log-OP head: `LogOPHead` returns log-probs, already soft-capped per stage,
    so this processor does not soft-cap again (LogitsProcessor soft-caps by its `final_logit_softcapping`)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        self.final_logit_softcapping = None


class LogOPHead:
    """The Log-OP head as SGLang's logits processor sees an lm_head: it has the head's `weight` and a `quant_method`
    whose `apply` the processor calls (`LogitsProcessor._compute_lm_head`: `should_apply_lm_head_quant_method` holds
    for any method outside the unquantized ones). `apply` is `layers.head_logits` over the readout, each stage
    through lm_head's own method and the soft-cap, -inf on padded vocabulary rows. A plain object, not a module, so
    the model's parameters and state dict hold lm_head once."""

    def __init__(self, lm_head: ParallelLMHead, cfg: CognicaConfig):
        self.lm_head, self.n_embd, self.vocab_size = lm_head, cfg.n_embd, cfg.vocab_size
        self.quant_method = self

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def stage_logits(self, h: torch.Tensor) -> torch.Tensor:
        return layers.softcap(self.lm_head.quant_method.apply(self.lm_head, h, None)[..., :self.vocab_size])

    def apply(self, layer: nn.Module, hidden: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lp = layers.head_logits(hidden, self.n_embd, self.stage_logits)
        pad = self.lm_head.weight.shape[0] - self.vocab_size
        return torch.nn.functional.pad(lp, (0, pad), value=float("-inf")) if pad > 0 else lp


def _alias(name: str) -> type[CognicaPoEForCausalLM]:
    """The same model under another architecture string (SGLang keys its registry by class name)."""
    return type(name, (CognicaPoEForCausalLM,), {"__doc__": f"{name}: alias of CognicaPoEForCausalLM."})


EntryClass = [CognicaPoEForCausalLM] + [_alias(n) for n in ARCHITECTURE_ALIASES if n != "CognicaPoEForCausalLM"]
