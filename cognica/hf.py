"""Hugging Face registration: `AutoConfig` / `AutoModelForCausalLM` work on a checkpoint directory
with no `trust_remote_code`, for the engines (which read the config through transformers) and for
users of the reference model.

`CognicaPoEConfig` accepts nanochat and HF field names (see `cognica.config`) and exposes both,
plus what the engines read: `head_dim`, `intermediate_size`, `final_logit_softcapping`, the
per-layer windows, and SGLang's hybrid sliding-window fields derived from `window_pattern`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from cognica.config import (
    _ALIASES,
    ARCHITECTURE,
    LOGIT_SOFTCAP,
    MODEL_TYPE,
    ROPE_BASE,
    CognicaConfig,
)
from cognica.generation import KVCache
from cognica.model import CognicaLayout, Gate

logger = logging.getLogger(__name__)
# the CognicaConfig fields kept as attributes (the PoE stage options included) and read back by `to_cognica`
CORE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len", "window_pattern",
               "poe_mode", "poe_every", "poe_exit_stage", "poe_head", "poe_force")


class CognicaPoEConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any):
        fields = {s: kwargs.pop(s) for spellings in _ALIASES.values() for s in spellings if s in kwargs}
        if fields.get("poe_exit_stage") is not None and "n_layer" in fields:
            for alias in _ALIASES["n_layer"][1:]:
                fields.pop(alias, None)  # a stage prefix's num_hidden_layers is its built layers (_set_built_layers)
        # transformers builds a default instance (no fields) to diff against: give it the release shape
        cfg = CognicaConfig.from_dict(fields) if fields else CognicaConfig()
        for key in ("head_dim", "intermediate_size", "rope_theta", "final_logit_softcapping", "tie_word_embeddings",
                    "is_hybrid_swa", "hybrid_layer_pattern", "layer_types", "sliding_window", "rope_parameters"):
            kwargs.pop(key, None)  # derived below; a stale saved value never wins
        kwargs.setdefault("bos_token_id", 32759)
        kwargs.setdefault("eos_token_id", 32759)
        super().__init__(tie_word_embeddings=False, **kwargs)
        for name in CORE_FIELDS:
            setattr(self, name, getattr(cfg, name))
        self._set_built_layers()
        self.num_attention_heads = cfg.n_head
        self.num_key_value_heads = cfg.n_kv_head
        self.hidden_size = cfg.n_embd
        self.max_position_embeddings = cfg.sequence_len
        self.head_dim = cfg.head_dim
        self.intermediate_size = cfg.mlp_hidden
        self.hidden_act = "relu2"
        self.rope_theta = ROPE_BASE
        self.final_logit_softcapping = LOGIT_SOFTCAP
        # SGLang's hybrid SWA pool: 1 marks a sliding layer (see cognica_sglang)
        self.hybrid_layer_pattern = [int(s) for s in cfg.is_sliding]
        self.is_hybrid_swa = any(cfg.is_sliding)
        self.window_left = list(cfg.window_left)

    def __setattr__(self, key: str, value: Any) -> None:
        super().__setattr__(key, value)
        if key in ("poe_exit_stage", "poe_every") and "n_layer" in self.__dict__:
            self._set_built_layers()

    def _set_built_layers(self) -> None:
        """`num_hidden_layers` = the layers the model builds (poe_every * poe_exit_stage for a stage prefix), so an
        engine allocates KV cache for those only. SGLang sizes its pool by it (`ModelConfig._derive_model_shapes` in
        sglang/srt/configs/model_config.py, `_compute_model_num_layers` in
        sglang/srt/model_executor/model_runner_components/layer_setup.py). Engine overrides arrive after __init__
        through `config.update` (SGLang: `get_config` in sglang/srt/utils/hf_transformers/config.py; vLLM: `get_config`
        in vllm/transformers_utils/config.py), hence the hook in __setattr__. `n_layer` stays the checkpoint's;
        an invalid stage leaves all layers here and is refused by `to_cognica()`."""
        stage, every = self.__dict__.get("poe_exit_stage"), self.__dict__.get("poe_every")
        built = stage * every if isinstance(stage, int) and isinstance(every, int) else self.n_layer
        self.num_hidden_layers = built if 0 < built <= self.n_layer else self.n_layer

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CognicaPoEConfig:
        """AutoConfig's entry (vLLM and SGLang load the config through it in their first process): for a local
        checkpoint directory, validate the whole checkpoint here, before any engine allocates memory, so a bad
        tensor, file or field fails fast with one specific message."""
        path = kwargs.get("name_or_path")
        if path and os.path.isfile(os.path.join(path, "config.json")):
            _validate_at_load(Path(path))
        elif path:
            from cognica.hub import cached_snapshot

            # a Hub id (SGLang passes it as is: `HfModelConfigParser.parse` in
            # sglang/srt/utils/hf_transformers/config.py; vLLM too when online): the cached snapshot it was read from
            snapshot = cached_snapshot(str(path), config_dict)
            if snapshot is not None:
                _validate_at_load(snapshot, weights_optional=True)
        return super().from_dict(config_dict, **kwargs)

    def to_cognica(self) -> CognicaConfig:
        # reads the attributes, so engine overrides applied after __init__ (vLLM --hf-overrides, SGLang
        # --json-model-override-args, e.g. {"poe_exit_stage": 1}) reach the model, validated here
        return CognicaConfig.from_dict({k: getattr(self, k) for k in CORE_FIELDS})


def _validate_at_load(root: Path, weights_optional: bool = False) -> None:
    """The checkpoint (weights may still be downloading in a Hub snapshot) and, for a published tokenizer.pkl
    without tokenizer.json, its conversion (cached; a hostile or malformed pickle is refused here, at start)."""
    from cognica.checkpoint import INDEX_FILE, SINGLE_FILE, open_checkpoint
    from cognica.tokenizer import converted_tokenizer

    if not weights_optional or (root / SINGLE_FILE).exists() or (root / INDEX_FILE).exists():
        open_checkpoint(root)
    if (root / "tokenizer.pkl").is_file() and not (root / "tokenizer.json").is_file():
        converted_tokenizer(root / "tokenizer.pkl")


def cognica_config(hf_config: Any) -> CognicaConfig:
    """The frozen core config from whatever HF config object an engine hands a model."""
    if isinstance(hf_config, CognicaPoEConfig):
        return hf_config.to_cognica()
    return CognicaConfig.from_dict(hf_config.to_dict())


class CognicaPoEForCausalLM(CognicaLayout, PreTrainedModel):
    """The reference model (`cognica.model`: the same module tree and forward) as transformers' causal LMs are laid
    out: the published tensor names at the top level (`transformer.wte`, `transformer.h.N...`, `lm_head`,
    `value_embeds.N`, the scalars), so `save_pretrained` writes the published layout and tools that match module names
    (PEFT's `target_modules`, llm-compressor's `ignore=["lm_head"]`) see the names in-tree models have; the gates
    are not `nn.Linear` (`cognica.model.Gate`), so `targets="Linear"` and `"all-linear"` leave them in float.
    `from_pretrained` goes through the validated loader (`cognica.checkpoint`), so every native name variant loads
    and bad files fail clearly."""

    config_class = CognicaPoEConfig
    base_model_prefix = "transformer"  # as GPT-2's in-tree classes name the trunk
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CognicaBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _tied_weights_keys: dict[str, str] = {}  # lm_head is untied from wte
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)(cos|sin)$"]  # rotary buffers some exporters save

    def __init__(self, config: CognicaPoEConfig):
        super().__init__(config)
        self._build(config.to_cognica())
        self.gradient_checkpointing = False
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """From-config construction (not `from_pretrained`): projections and tables N(0, 0.02), gates 0, and the
        scalars at the identity (resid 1, x0 / smear / backout 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, Gate):
            nn.init.zeros_(module.weight)
        elif module is self:
            nn.init.ones_(self.resid_lambdas)
            for scalar in (self.x0_lambdas, self.smear_lambda, self.backout_lambda):
                nn.init.zeros_(scalar)

    def get_input_embeddings(self) -> nn.Module:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, position_ids: torch.Tensor | None = None,
                cache_position: torch.Tensor | None = None, logits_to_keep: int = 0,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """transformers' causal-LM forward. `attention_mask` (1 = token, 0 = padding; left or right padding) makes
        each row equal its tokens alone; `labels` gives the mean shifted cross-entropy over labels != -100 (or the
        sum / `num_items_in_batch`, as Trainer passes it) on the soft-capped fp32 logits. `past_key_values` is a
        `cognica.generation.KVCache` this model filled (none is made unless one is passed). Position ids follow from the
        mask (`position_ids` / `cache_position`, which transformers may pass, must agree with it: they are not read).
        """
        if input_ids is None:
            raise ValueError("CognicaPoEForCausalLM needs input_ids: smear and the value embeddings read token ids, "
                             "so inputs_embeds cannot replace them")
        if inputs_embeds is not None or output_attentions or output_hidden_states:
            raise ValueError("CognicaPoEForCausalLM: inputs_embeds, output_attentions and output_hidden_states are "
                             "not supported (the logits and the loss are)")
        if past_key_values is not None and not isinstance(past_key_values, KVCache):
            raise ValueError("past_key_values must be a cognica.generation.KVCache, got "
                             f"{type(past_key_values).__name__}")
        logits = self.forward_logits(input_ids, past_key_values, attention_mask)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels.to(logits.device), kwargs.get("num_items_in_batch"))
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    @classmethod
    def can_generate(cls) -> bool:
        return True  # our own generate (cognica.generation), which pipeline("text-generation") calls

    def generate(self, input_ids: torch.Tensor | None = None, generation_config: Any = None,
                 **kwargs: Any) -> torch.Tensor:
        """KV-cache generation of the reference with transformers' semantics for the keywords it supports, on
        left-padded batches too (`attention_mask`); a keyword that would change the output otherwise raises (see
        `cognica.generation`)."""
        from cognica.generation import generate

        input_ids = kwargs.pop("inputs", None) if input_ids is None else input_ids
        if input_ids is None:
            raise ValueError("generate() needs input_ids")
        if generation_config is not None:
            kwargs["generation_config"] = generation_config
        return generate(self, input_ids, self.generation_config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike[str], *args: Any, dtype: Any = None,
                        torch_dtype: Any = None, **kwargs: Any) -> CognicaPoEForCausalLM:
        """A checkpoint directory or Hub id (resolved through huggingface_hub's cache; the repo's *.py are
        neither downloaded nor imported). dtype "auto" is config.json's torch_dtype, as in transformers.
        `config.name_or_path` is the id or directory given (tools such as llm-compressor reload from it)."""
        from transformers import GenerationConfig

        from cognica.checkpoint import open_checkpoint
        from cognica.hub import resolve

        root = resolve(str(pretrained_model_name_or_path), revision=kwargs.get("revision"),
                       cache_dir=kwargs.get("cache_dir"), token=kwargs.get("token"),
                       local_files_only=bool(kwargs.get("local_files_only")))
        config = kwargs.get("config")
        if not isinstance(config, CognicaPoEConfig):
            config = CognicaPoEConfig.from_pretrained(root)
        dtype = dtype or torch_dtype or torch.float32
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        ckpt = open_checkpoint(root)
        cfg = config.to_cognica()
        with torch.device("meta"):
            model = cls(config)
        model = model.to_empty(device="cpu").to(dtype)
        # a stage prefix reads only the tensors it builds
        model.load_state_dict(ckpt.state_dict(dtype, keep=cfg.is_built), strict=True)
        if (root / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(root)
        model.name_or_path = model.config.name_or_path = str(pretrained_model_name_or_path)
        model.config.dtype = dtype
        return model.eval()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of logits[:, t] against labels[:, t + 1] in fp32, ignoring -100: the mean over counted
    tokens, or their sum / `num_items_in_batch` (Trainer's count over a gradient-accumulation step)."""
    logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=-100)
    total = F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
    return total / torch.as_tensor(num_items_in_batch, device=total.device)


_registered = False


def register() -> None:
    """Register the config, the reference model and the BOS-once tokenizer with transformers' Auto classes
    (idempotent). Both engine plugins call this in every engine process."""
    global _registered
    if _registered:
        return
    AutoConfig.register(MODEL_TYPE, CognicaPoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(CognicaPoEConfig, CognicaPoEForCausalLM, exist_ok=True)
    from cognica.hf_tokenizer import register_tokenizer

    register_tokenizer(CognicaPoEConfig)
    _registered = True


__all__ = ["ARCHITECTURE", "CognicaPoEConfig", "CognicaPoEForCausalLM", "cognica_config", "register"]
