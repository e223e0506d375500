# SPDX-License-Identifier: Apache-2.0
"""Cognica-BP/PoE-v1.0-1.3B-base (nanochat GPT) on vLLM's paged KV cache.

Laid out like vLLM's gemma2.py; the math is `cognica.layers` (shared with the reference and SGLang).
What is not a Llama here: smear (previous token of the same sequence, see `cognica_vllm.smear`),
x0/resid lambdas, value embeddings with per-KV-head gates, nanochat's rotary sign (vLLM's neox rotary with
negated frequencies, `CognicaRotaryEmbedding`; the weights load as published),
QK rms-norm x1.2, per-layer windows (3 sliding, 1 full), backout, logit soft-cap 15.
"""


import os
import re
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import (
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
)
from vllm.logger import init_logger
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    QKVParallelLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP
from vllm.model_executor.models.utils import WeightsMapper, extract_layer_index, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from cognica import layers
from cognica.checkpoint import (
    WRAPPER_PREFIXES,
    CheckpointError,
    canonical_name,
    expected_tensors,
    open_checkpoint,
    padded_vocab,
    quantization_layout,
)
from cognica.config import LOGIT_SOFTCAP, ROPE_BASE, SMEAR_CHANNELS, VE_GATE_CHANNELS, CognicaConfig
from cognica_kernels import use_triton
from cognica_kernels.cpu_linear import UpcastLinear, min_rows, upcast_wanted
from cognica_vllm.attention import cognica_paged_attention, register_splitting, use_cognica_attention
from cognica_vllm.smear import SmearState, smear_prev_ids
from cognica_vllm.spec_decode import model_config

logger = init_logger(f"vllm.{__name__}")  # under "vllm": vLLM's log handler prints it

# (fused param, nanochat name, shard id): the only renames; everything else keeps nanochat's name
STACKED_PARAMS = [("qkv_proj", "c_q", "q"), ("qkv_proj", "c_k", "k"), ("qkv_proj", "c_v", "v")]

# LoRA reaches every projection (vLLM wraps each LinearBase: lora.utils.get_supported_lora_modules), the input
# embedding and the head (embedding_modules: VocabParallelEmbeddingWithLoRA, LogitsProcessorWithLoRA). Value
# embeddings, ve_gate, smear_gate and the scalars are not adaptable: LORA_NAMES refuses adapters that target them.
ADAPTABLE = re.compile(r"^(model\.layers\.\d+\.(attn\.(c_q|c_k|c_v|c_proj)|mlp\.(c_fc|c_proj))|model\.wte|lm_head)\.")
LORA_TENSOR = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_embedding_[AB]$")
_WRAPPERS = "(?:" + "|".join(re.escape(p) for p in WRAPPER_PREFIXES) + ")*"


class CognicaLoRANames(WeightsMapper):
    """nanochat module paths in a PEFT adapter (`transformer.h.{i}.attn.c_q`, with or without a wrapper prefix such
    as our transformers class's `model.`) -> this module's names; a LoRA tensor on a module LoRA cannot reach raises
    here, inside vLLM's adapter load (WorkerLoRAManager._load_adapter -> LoRAModel.from_local_checkpoint ->
    parse_fine_tuned_lora_name), instead of vLLM's generic unexpected-modules list."""

    def _map_name_with_shard(self, key: str):
        result = super()._map_name_with_shard(key)
        if result is not None and LORA_TENSOR.search(key) and not ADAPTABLE.match(result[0]):
            module = LORA_TENSOR.sub("", canonical_name(key))
            raise ValueError(f"cognica: a LoRA adapter targets {module}, which this model cannot adapt; LoRA reaches "
                             "attn.c_q/c_k/c_v/c_proj, mlp.c_fc/c_proj, transformer.wte and lm_head (value "
                             "embeddings, ve_gate, smear_gate and the scalars are not adaptable)")
        return result


LORA_NAMES = CognicaLoRANames(orig_to_new_regex={
    re.compile(rf"^{_WRAPPERS}transformer\.h\."): "model.layers.",
    re.compile(rf"^{_WRAPPERS}transformer\.wte(?=\.|$)"): "model.wte",
    re.compile(rf"^{_WRAPPERS}value_embeds\."): "model.value_embeds.",
    re.compile(rf"^{_WRAPPERS}lm_head(?=\.|$)"): "lm_head",
})


def mlp_activation():
    """relu^2: torch's (fused by the engine's compile), or the cognica_kernels Triton kernel on CUDA where
    COGNICA_KERNELS chooses it (cognica_kernels.dispatch)."""
    from vllm.platforms import current_platform

    if use_triton("relu2", current_platform.is_cuda(), logger):
        from cognica_kernels.relu2 import relu2

        return relu2
    return layers.relu2


def local_kv_heads(n_kv_head: int) -> tuple[int, int]:
    """[first, last) KV heads this tensor-parallel rank holds, as QKVParallelLinear shards them
    (partitioned when n_kv_head >= tp, replicated otherwise)."""
    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    if n_kv_head >= tp:
        per = n_kv_head // tp
        return rank * per, (rank + 1) * per
    first = rank // (tp // n_kv_head)
    return first, first + 1


class CognicaRotaryEmbedding(RotaryEmbedding):
    """vLLM's neox rotary (its kernels included) rotating by nanochat's -theta (`layers.nanochat_inv_freq`)."""

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return layers.nanochat_inv_freq(super()._compute_inv_freq(base))


class CognicaMLP(nn.Module):
    def __init__(self, cfg: CognicaConfig, quant_config: QuantizationConfig | None, prefix: str = ""):
        super().__init__()
        self.c_fc = ColumnParallelLinear(cfg.n_embd, cfg.mlp_hidden, bias=False, quant_config=quant_config,
                                         prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(cfg.mlp_hidden, cfg.n_embd, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.act = mlp_activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.c_fc(x)
        out, _ = self.c_proj(self.act(h))
        return out


class CognicaAttention(nn.Module):
    def __init__(self, cfg: CognicaConfig, max_model_len: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str = ""):
        super().__init__()
        layer_idx = extract_layer_index(prefix)
        tp = get_tensor_model_parallel_world_size()
        assert cfg.n_head % tp == 0, f"{cfg.n_head} query heads do not split over tensor-parallel size {tp}"
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.n_head // tp
        self.kv_first, kv_last = local_kv_heads(cfg.n_kv_head)
        self.num_kv_heads = kv_last - self.kv_first
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head, bias=False,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.c_proj = RowParallelLinear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.has_ve = layer_idx in cfg.ve_layers
        if self.has_ve:  # [n_kv_head, 12], full; this rank uses its KV heads' rows
            self.ve_gate = nn.Parameter(torch.empty(cfg.n_kv_head, VE_GATE_CHANNELS), requires_grad=False)
        # built here, not through get_rope: get_rope shares one instance between models with the same arguments
        self.rotary_emb = CognicaRotaryEmbedding(cfg.head_dim, cfg.head_dim, max(max_model_len, cfg.sequence_len),
                                                 ROPE_BASE, True, torch.get_default_dtype())
        # vLLM counts the query in the window: keys = window_left + 1. An L layer is full attention
        # until the context outgrows its window (only past sequence_len + 1 tokens).
        keys = cfg.window_keys[layer_idx]
        window = keys if keys < max_model_len else None
        self.window_left = None if window is None else window - 1
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
                              cache_config=cache_config, quant_config=quant_config,
                              per_layer_sliding_window=window, prefix=f"{prefix}.attn")
        from vllm.platforms import current_platform

        vllm_config = get_current_vllm_config()
        self.max_model_len = max_model_len
        self.triton_attention = use_cognica_attention(self.attn.attn_backend.get_name(), current_platform.is_cuda(),
                                                      self.attn.kv_cache_torch_dtype, vllm_config.model_config.dtype)
        if self.triton_attention:
            register_splitting(vllm_config)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if ve is not None:
            gate_w = self.ve_gate[self.kv_first:self.kv_first + self.num_kv_heads]
            v = layers.add_value_embedding(v, h, ve, gate_w, self.num_kv_heads)
        q, k = self.rotary_emb(positions, q, k)
        q, k = layers.qk_norm(q.unflatten(-1, (-1, self.head_dim)), k.unflatten(-1, (-1, self.head_dim)))
        q, k = q.flatten(-2), k.flatten(-2)
        if self.triton_attention:
            out = cognica_paged_attention(q, k, v, self.attn.layer_name, self.window_left, self.max_model_len)
        else:
            out = self.attn(q, k, v)
        out, _ = self.c_proj(out)
        return out


class CognicaDecoderLayer(nn.Module):
    def __init__(self, cfg: CognicaConfig, max_model_len: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str = ""):
        super().__init__()
        self.attn = CognicaAttention(cfg, max_model_len, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.mlp = CognicaMLP(cfg, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ve: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(positions, layers.norm(x), ve)
        return x + self.mlp(layers.norm(x))


@support_torch_compile
class CognicaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = model_config(vllm_config)  # a stage prefix builds only layers 0..n_active_layers-1
        self.config = cfg
        max_len = vllm_config.model_config.max_model_len
        vocab = padded_vocab(cfg)
        self.wte = VocabParallelEmbedding(vocab, cfg.n_embd, prefix=f"{prefix}.wte")
        if cfg.poe_head == "logop" and get_pp_group().world_size > 1:
            raise ValueError("poe_head='logop' reads every stage end on the last pipeline rank: use "
                             "pipeline_parallel_size=1")
        # the residual streams read out: every built stage end (Log-OP head) or the last built layer
        self.exits = cfg.active_stage_ends if cfg.poe_head == "logop" else (cfg.n_active_layers - 1,)
        self.start_layer, self.end_layer, self.layers = make_layers(
            cfg.n_active_layers,
            lambda prefix: CognicaDecoderLayer(cfg, max_len, vllm_config.cache_config, vllm_config.quant_config,
                                               prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        local = range(self.start_layer, self.end_layer)
        self.value_embeds = nn.ModuleDict(
            {str(i): VocabParallelEmbedding(vocab, cfg.kv_dim, prefix=f"{prefix}.value_embeds.{i}")
             for i in cfg.ve_layers if i in local}
        )
        self.kv_first, kv_last = local_kv_heads(cfg.n_kv_head)
        self.kv_slice = slice(self.kv_first * cfg.head_dim, kv_last * cfg.head_dim)
        self.resid_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.x0_lambdas = nn.Parameter(torch.empty(cfg.n_layer), requires_grad=False)
        self.smear_gate = nn.Parameter(torch.empty(1, SMEAR_CHANNELS), requires_grad=False)
        self.smear_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        self.backout_lambda = nn.Parameter(torch.empty(1), requires_grad=False)
        if get_pp_group().is_first_rank:
            # smear reads the previous token id through the KV slots of a full-attention layer; a stage prefix of
            # S layers only (stage 1 of 2-layer stages) uses a sliding layer's: smear reads only position p-1, and
            # vLLM frees only blocks before num_computed_tokens - window + 1 (vllm/v1/core/
            # single_type_kv_cache_manager.py:1135-1170), so p-1 stays allocated while p is computed
            full = [i for i in local if not cfg.is_sliding[i]] or list(local)
            if not full:
                raise ValueError("pipeline split leaves the first rank without a full-attention layer; smear "
                                 "needs one (use fewer pipeline stages)")
            self.smear_state = SmearState(vllm_config, f"{prefix}.layers.{full[0]}.attn.attn", prefix=f"{prefix}.smear")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return layers.norm(self.wte(input_ids))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        cfg = self.config
        if get_pp_group().is_first_rank:
            assert input_ids is not None, "Cognica needs token ids (smear and value embeddings read them)"
            x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
            prev = smear_prev_ids(input_ids, positions, self.smear_state.name)
            x_prev = self.embed_input_ids(prev.clamp(min=0))
            x = layers.smear(x, x_prev, self.smear_gate, self.smear_lambda, (prev >= 0).unsqueeze(-1))
            x0, x_backout = x, torch.zeros_like(x)
        else:
            assert intermediate_tensors is not None
            x, x0 = intermediate_tensors["hidden_states"], intermediate_tensors["x0"]
            x_backout = intermediate_tensors["x_backout"]
        tails = []
        for i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):
            x = layers.mix_residual(x, x0, self.resid_lambdas[i], self.x0_lambdas[i])
            ve = self.value_embeds[str(i)](input_ids)[..., self.kv_slice] if str(i) in self.value_embeds else None
            x = layer(positions, x, ve)
            if i == cfg.backout_layer:
                x_backout = x
            if i in self.exits:
                tails.append(layers.norm(layers.exit_tail(x, x_backout, self.backout_lambda, cfg.exit_backout(i))))
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": x, "x0": x0, "x_backout": x_backout})
        # Log-OP: the stage ends' normed streams side by side, [T, n_exits * n_embd]; vLLM only indexes the rows
        # (gpu_model_runner: hidden_states[logits_indices]) before compute_logits splits them again
        return tails[0] if len(tails) == 1 else torch.cat(tails, dim=-1)


class CognicaPoEForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
    # as vLLM's LlamaForCausalLM: the fused QKV's parts and the two vocab tables LoRA may adapt
    packed_modules_mapping = {"qkv_proj": ["c_q", "c_k", "c_v"]}
    embedding_modules = {"wte": "input_embeddings", "lm_head": "output_embeddings"}
    hf_to_vllm_mapper = LORA_NAMES

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_path = vllm_config.model_config.model
        if os.path.isdir(model_path):
            open_checkpoint(model_path)  # names, shapes, dtypes, files: fail before any allocation
        cfg = model_config(vllm_config)
        self.config = cfg
        # config.json's, which the HF config keeps (cognica_config drops it); vLLM built vllm_config.quant_config
        # from it, which every linear layer below receives
        self.quantization_config = getattr(vllm_config.model_config.hf_config, "quantization_config", None)
        refuse_longer_context(vllm_config.model_config.max_model_len, cfg)
        self.model = CognicaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(padded_vocab(cfg), cfg.n_embd, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(cfg.vocab_size, soft_cap=LOGIT_SOFTCAP)

    def make_empty_intermediate_tensors(self, batch_size: int, dtype: torch.dtype,
                                        device: torch.device) -> IntermediateTensors:
        return IntermediateTensors({k: torch.zeros(batch_size, self.config.n_embd, dtype=dtype, device=device)
                                    for k in ("hidden_states", "x0", "x_backout")})

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.config.poe_head != "logop":
            return self.logits_processor(self.lm_head, hidden_states)
        # Log-OP: soft-capped logits per stage end, combined into normalised log-probs (not soft-capped again)
        stages = hidden_states.chunk(len(self.model.exits), dim=-1)
        return layers.logop_from_logits([self.logits_processor(self.lm_head, h) for h in stages])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        cfg = self.config
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        seen: set[str] = set()
        expected = expected_tensors(cfg)
        # a pre-quantized checkpoint's scales / zero points (cognica.checkpoint.quantization_layout) load into the
        # parameters the quantization scheme created on the same linear layer (e.g. CompressedTensorsW8A8Int8's
        # weight_scale, input_scale), through the same QKV shard mapping as the weight
        quant_extras = quantization_layout(cfg, self.quantization_config).extras
        for stored_name, tensor in weights:
            name = canonical_name(stored_name)
            if name not in expected and name not in quant_extras:
                continue  # open_checkpoint already refused unknown tensors; skip known-ignorable buffers
            seen.add(name)
            if not cfg.is_built(name):
                continue  # a layer (or its value-embedding table) past a stage prefix's exit
            if name in quant_extras:
                module, suffix = name.rsplit(".", 1)
                target = vllm_name(f"{module}.weight").removesuffix("weight") + suffix
            else:
                target = vllm_name(name)
            stacked = next(((f, part, s) for f, part, s in STACKED_PARAMS if f".attn.{part}." in name), None)
            shard = None
            if stacked is not None:
                fused, part, shard = stacked
                target = target.replace(f".attn.{part}.", f".attn.{fused}.")
            if target not in params:
                if name in quant_extras and target.rsplit(".", 1)[0] + ".weight" in params:
                    raise CheckpointError(f"{name}: vLLM built this layer without the checkpoint's quantization "
                                          "scheme (its quant_config did not reach it)")
                continue  # another pipeline stage owns it
            param = params[target]
            if shard is not None:
                param.weight_loader(param, tensor, shard)
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(target)
        missing = [n for n in expected if n not in seen]
        if missing:
            raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
        return loaded

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own CPU GEMM dispatch: see `use_upcast_linear`."""
        use_upcast_linear(self)


def use_upcast_linear(model: nn.Module) -> int:
    """On a CPU without bf16 matrix instructions, vLLM's bf16 linears fall back to torch's generic bf16 GEMM
    (~6x slower than fp32 MKL there); point their `cpu_linear` at `cognica_kernels.cpu_linear.UpcastLinear`
    (an fp32 weight copy used from a few rows on). Layers vLLM gave a packed kernel (oneDNN, zentorch, sgl)
    keep it: those remove `weight`. Returns the number of layers switched."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    switched, extra, dtype = 0, 0, None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (LinearBase, ParallelLMHead)) or not hasattr(module, "cpu_linear"):
            continue
        if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or weight.numel() == 0:
            continue
        if not upcast_wanted(weight.dtype, weight.device):
            continue
        module.cpu_linear = UpcastLinear(weight)
        switched, dtype = switched + 1, weight.dtype
        extra += module.cpu_linear.extra_bytes
    if switched:
        logger.info("cognica: %d %s linear layers take fp32 weight copies from %d rows on (this CPU has no bf16 "
                    "matmul instructions; +%.2f GiB; COGNICA_CPU_LINEAR=off to disable)", switched,
                    str(dtype).removeprefix("torch."), min_rows(), extra / 2**30)
    return switched


def refuse_longer_context(max_model_len: int, cfg: CognicaConfig) -> None:
    """vLLM refuses a max_model_len above max_position_embeddings (= sequence_len) unless
    VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 (vllm/config/model.py:2639-2666); past the training context the L layers would
    become sliding layers and RoPE would see untrained positions, none of it tested: refuse it here too."""
    if max_model_len > cfg.sequence_len:
        raise ValueError(f"cognica: max_model_len {max_model_len} is longer than the {cfg.sequence_len}-token context "
                         f"the model was trained with; use --max-model-len {cfg.sequence_len} or less")


def vllm_name(name: str) -> str:
    """nanochat canonical name -> this module's parameter name (before the QKV fusion)."""
    if name == "lm_head.weight":
        return name
    name = name.replace("transformer.h.", "layers.", 1).replace("transformer.wte.", "wte.", 1)
    if name.endswith(("ve_gate.weight", "smear_gate.weight")):
        name = name[: -len(".weight")]  # plain parameters here, not nn.Linear
    return f"model.{name}"
