# SPDX-License-Identifier: Apache-2.0
# Laid out like vLLM's gemma2.py and llama.py; cognica_sglang/model.py is its mirror, class for class and name for
# name, so a diff of the two shows only what differs between the engines.
"""Cognica-BP/PoE-v1.0-1.3B-base (nanochat GPT) on vLLM's paged KV cache.

What differs from a Llama, and where it is handled (the math itself is in `cognica.layers`):
- rotary: nanochat rotates by -theta: vLLM's neox rotary with negated frequencies (`CognicaRotaryEmbedding`),
  so the weights load as published (`cognica.weights`);
- per-head QK rms norm x 1.2 after rope, attention scale 1/sqrt(head_dim);
- per-layer windows: `Attention(per_layer_sliding_window=keys)`, vLLM counting the query among the keys;
- value embeddings (vocab-parallel tables) gated per KV head on alternating layers;
- smear of the previous token's normed embedding, with the previous token read from vLLM's KV slot bookkeeping
  (`cognica_vllm.smear`), exact under chunked prefill, prefix caching and preemption;
- x0 residual lambdas, backout, relu^2 MLP, untied head, final soft-cap 15 (`LogitsProcessor(soft_cap=15)`);
- PoE stage modes (`--hf-overrides '{"poe_exit_stage": k}'` / `'{"poe_head": "logop"}'`): only the layers of
  stages 1..k are built, loaded and given KV cache; the head reads `cfg.readout_layers` (`layers.readout`) and
  combines them with `layers.head_logits`, shared with the reference.
"""

# no `from __future__ import annotations`: @support_torch_compile reads forward's annotations as types
import os
from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    PPMissingLayer,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from cognica import layers
from cognica.config import LOGIT_SOFTCAP, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig
from cognica.names import padded_vocab
from cognica.serving import ServingSettings, check_before_build, refuse, served_window_left
from cognica.weights import engine_weights, load_parameters
from cognica_kernels.dispatch import relu2_activation
from cognica_vllm.attention import cognica_paged_attention, register_splitting, use_cognica_attention
from cognica_vllm.config import model_config
from cognica_vllm.cpu_linear import use_upcast_linear
from cognica_vllm.lora import CognicaLoRA
from cognica_vllm.smear import SmearState

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's log handler prints it


def tp_rank_and_size() -> tuple[int, int]:
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


class CognicaRotaryEmbedding(RotaryEmbedding):
    """vLLM's neox rotary (its kernels included) rotating by nanochat's -theta (`layers.nanochat_inv_freq`)."""

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return layers.nanochat_inv_freq(super()._compute_inv_freq(base))


class CognicaMLP(nn.Module):
    def __init__(self, cfg: CognicaConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.n_embd, cfg.mlp_hidden, bias=False, quant_config=quant_config,
                                         prefix=maybe_prefix(prefix, "c_fc"))
        self.c_proj = RowParallelLinear(cfg.mlp_hidden, cfg.n_embd, bias=False, quant_config=quant_config,
                                        prefix=maybe_prefix(prefix, "c_proj"))
        from vllm.platforms import current_platform

        self.act_fn = relu2_activation(current_platform.is_cuda(), logger)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.c_fc(x)
        x, _ = self.c_proj(self.act_fn(h))
        return x


class CognicaAttention(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_id: int, context_len: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 cache_config: CacheConfig | None = None) -> None:
        super().__init__()
        tp_rank, tp_size = tp_rank_and_size()  # refused unless it shards the heads: `cognica.serving.refusals`
        self.head_dim = cfg.head_dim
        self.kv_heads = cfg.local_kv_heads(tp_size, tp_rank)  # vLLM replicates KV heads when tp > n_kv_head
        self.num_heads, self.num_kv_heads = cfg.n_head // tp_size, len(self.kv_heads)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, bias=False,
                                          quant_config=quant_config, prefix=maybe_prefix(prefix, "qkv_proj"))
        self.c_proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False,
                                        quant_config=quant_config, prefix=maybe_prefix(prefix, "c_proj"))
        # [n_kv_head, 12], whole on every rank; a rank gates its own KV heads' rows
        self.ve_gate = (nn.Parameter(torch.empty(cfg.n_kv_head, VE_GATE_CHANNELS), requires_grad=False)
                        if layer_id in cfg.ve_layers else None)
        # built here, not through get_rope: get_rope shares one instance between models with the same arguments
        self.rotary_emb = CognicaRotaryEmbedding(cfg.head_dim, cfg.head_dim, context_len, ROPE_BASE, True,
                                                 torch.get_default_dtype())
        # `cognica.serving.served_window_left` (None: full attention); vLLM counts the query among a window's keys
        self.window_left = served_window_left(cfg, layer_id, context_len)
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=None if self.window_left is None else self.window_left + 1,
                              prefix=maybe_prefix(prefix, "attn"))
        from vllm.platforms import current_platform

        vllm_config = get_current_vllm_config()
        self.context_len = context_len
        self.triton_attention = use_cognica_attention(self.attn.attn_backend.get_name(), current_platform.is_cuda(),
                                                      self.attn.kv_cache_torch_dtype, vllm_config.model_config.dtype)
        if self.triton_attention:
            register_splitting(vllm_config)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.ve_gate is not None:
            gate = self.ve_gate[self.kv_heads.start:self.kv_heads.stop]
            v = layers.add_value_embedding(v, h, ve, gate, self.num_kv_heads)
        q, k = self.rotary_emb(positions, q, k)
        q, k = layers.qk_norm(q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim)))
        q, k = q.flatten(-2), k.flatten(-2)
        if self.triton_attention:
            y = cognica_paged_attention(q, k, v, self.attn.layer_name, self.window_left, self.context_len)
        else:
            y = self.attn(q, k, v)
        out, _ = self.c_proj(y)
        return out


class CognicaDecoderLayer(nn.Module):
    def __init__(self, cfg: CognicaConfig, layer_id: int, context_len: int,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 cache_config: CacheConfig | None = None) -> None:
        super().__init__()
        self.attn = CognicaAttention(cfg, layer_id, context_len, quant_config, prefix=maybe_prefix(prefix, "attn"),
                                     cache_config=cache_config)
        self.mlp = CognicaMLP(cfg, quant_config, prefix=maybe_prefix(prefix, "mlp"))

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(positions, layers.norm(x), ve)
        return x + self.mlp(layers.norm(x))


@support_torch_compile
class CognicaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        self.config = cfg = model_config(vllm_config)  # a stage prefix builds only layers 0..n_active_layers-1
        context_len, quant_config = vllm_config.model_config.max_model_len, vllm_config.quant_config
        vocab = padded_vocab(cfg)
        self.wte = VocabParallelEmbedding(vocab, cfg.n_embd, prefix=maybe_prefix(prefix, "wte"))
        self.start_layer, self.end_layer, self.layers = make_layers(
            cfg.n_active_layers,
            lambda prefix: CognicaDecoderLayer(cfg, extract_layer_index(prefix), context_len, quant_config,
                                               prefix=prefix, cache_config=vllm_config.cache_config),
            prefix=maybe_prefix(prefix, "layers"),
        )
        local = range(self.start_layer, self.end_layer)
        self.value_embeds = nn.ModuleDict(
            {str(i): VocabParallelEmbedding(vocab, cfg.kv_dim, prefix=maybe_prefix(prefix, f"value_embeds.{i}"))
             for i in cfg.ve_layers if i in local}
        )
        kv_heads = cfg.local_kv_heads(*reversed(tp_rank_and_size()))
        self.kv_slice = slice(kv_heads.start * cfg.head_dim, kv_heads.stop * cfg.head_dim)  # this rank's ve columns
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.smear_gate = nn.Parameter(torch.empty(1, SMEAR_CHANNELS), requires_grad=False)
        self.smear_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.backout_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        if get_pp_group().is_first_rank:
            # smear reads the previous token id through the KV slots of a full-attention layer; a stage prefix of
            # S layers only (stage 1 of 2-layer stages) uses a sliding layer's: smear reads only position p-1, and
            # vLLM frees only blocks before num_computed_tokens - window + 1 (`SlidingWindowManager.
            # remove_skipped_blocks`), so p-1 stays allocated while p is computed
            full = [i for i in local if not cfg.is_sliding[i]] or list(local)
            self.smear_tokens = SmearState(vllm_config, f"{prefix}.layers.{full[0]}.attn.attn",
                                           prefix=maybe_prefix(prefix, "smear"))
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "x0", "x_backout"], cfg.n_embd)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return layers.norm(self.wte(input_ids))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        """The head's input (`layers.readout`), or this pipeline stage's streams for the next one."""
        cfg = self.config
        if get_pp_group().is_first_rank:
            assert input_ids is not None, "Cognica needs token ids (smear and value embeddings read them)"
            x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            prev_ids, has_prev = self.smear_tokens.previous(input_ids, positions)
            x = layers.smear(x, self.embed_input_ids(prev_ids), self.smear_gate, self.smear_lambda, has_prev)
            x0, x_backout = x, torch.zeros_like(x)
        else:
            assert intermediate_tensors is not None
            x, x0 = intermediate_tensors["hidden_states"], intermediate_tensors["x0"]
            x_backout = intermediate_tensors["x_backout"]

        def run_block(i: int, x: torch.Tensor) -> torch.Tensor:  # this stage's layer i (`make_layers` puts
            # PPMissingLayer outside start_layer..end_layer); a Python-int index, traced by @support_torch_compile
            ve = self.value_embeds[str(i)](input_ids)[..., self.kv_slice] if str(i) in self.value_embeds else None
            return self.layers[i](positions, x, ve)

        streams = layers.run_layers(cfg, self, range(self.start_layer, self.end_layer), run_block, x, x0, x_backout)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": streams.x, "x0": x0, "x_backout": streams.x_backout})
        # Log-OP reads several stage ends side by side, [T, n * n_embd]; vLLM only indexes the rows
        # (`GPUModelRunner`: hidden_states[logits_indices]) before compute_logits splits them again
        return streams.hidden

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """`cognica.weights` names under this module; layers and value-embedding tables another pipeline stage
        holds are skipped (as LlamaModel.load_weights does, through `is_pp_missing_parameter`)."""
        def absent(name: str) -> bool:
            return is_pp_missing_parameter(name, self) or name.startswith("value_embeds.")

        return load_parameters(dict(self.named_parameters()), weights, default_weight_loader, absent=absent)


class CognicaPoEForCausalLM(nn.Module, CognicaLoRA, SupportsLoRA, SupportsPP):
    # every pipeline stage reads token ids (value embeddings; smear on the first): vLLM's V2 runner passes
    # input_ids=None to later stages unless the model says so (`requires_raw_input_tokens` in
    # vllm/model_executor/models/interfaces.py, read by `GPUModelRunner.execute_model` in vllm/v1/worker/gpu/)
    requires_raw_input_tokens = True

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        # the CognicaConfig here; SGLang's model keeps the HF config in `config` because SGLang's LoRA pool reads it
        # there (`LoRAMemoryPool._get_num_experts`, `init_buffers` in sglang/srt/lora/mem_pool.py)
        self.config = cfg = model_config(vllm_config)
        model_path, context_len = vllm_config.model_config.model, vllm_config.model_config.max_model_len
        # the served context before anything reads vLLM's parallel state; the parallel rules again (the first process
        # refused the same, `cognica_vllm.config_checks`), as this process's groups have them
        check_before_build(cfg, model_path if os.path.isdir(model_path) else None,
                           ServingSettings(context_len=context_len, context_flag="--max-model-len"))
        refuse(cfg, ServingSettings(tensor_parallel=tp_rank_and_size()[1], pipeline_parallel=get_pp_group().world_size))
        # config.json's, which the HF config keeps (cognica_config drops it); vLLM built vllm_config.quant_config
        # from it, which every linear layer receives
        self.quantization_config = getattr(vllm_config.model_config.hf_config, "quantization_config", None)
        self.model = CognicaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(padded_vocab(cfg), cfg.n_embd, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(cfg.vocab_size, soft_cap=LOGIT_SOFTCAP)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        # the soft-capped logits of each stage end read out; Log-OP combines them (and is not soft-capped again)
        return layers.head_logits(hidden_states, self.config.n_embd,
                                  lambda h: self.logits_processor(self.lm_head, h))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(engine_weights(self.config, weights, self.quantization_config))

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own CPU GEMM dispatch: `cognica_vllm.cpu_linear`."""
        use_upcast_linear(self)
