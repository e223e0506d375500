# SPDX-License-Identifier: Apache-2.0
"""LoRA adapters on vLLM: which modules an adapter may reach, and its nanochat module names -> this plugin's.

vLLM wraps every `LinearBase` of the model (`get_supported_lora_modules` in vllm/lora/utils.py) and, through the
model's `embedding_modules`, the input embedding and the head (`VocabParallelEmbeddingWithLoRA`,
`LogitsProcessorWithLoRA`). Value embeddings, ve_gate, smear_gate and the scalars are plain tables or parameters
here: an adapter that targets them is refused with one line, inside vLLM's adapter load.
"""

from __future__ import annotations

import re

from vllm.model_executor.models.utils import WeightsMapper

from cognica.names import WRAPPER_PREFIXES, canonical_name
from cognica.weights import ENGINE_PREFIXES, engine_module, lora_module_pattern, unadaptable

# the core's LoRA table (`cognica.weights.LORA_MODULES`) in this plugin's names, before the QKV fusion
ADAPTABLE = re.compile(rf"^({lora_module_pattern(engine_module)})\.")
LORA_TENSOR = re.compile(r"\.(lora_A|lora_B)\.weight$|\.lora_embedding_[AB]$")
_WRAPPERS = "(?:" + "|".join(re.escape(p) for p in WRAPPER_PREFIXES) + ")*"


class CognicaLoRANames(WeightsMapper):
    """nanochat module paths in a PEFT adapter (`transformer.h.{i}.attn.c_q`, with or without a wrapper prefix such
    as our transformers class's `model.`) -> this plugin's names; a LoRA tensor on a module LoRA cannot reach raises
    here, inside vLLM's adapter load (`WorkerLoRAManager._load_adapter` -> `LoRAModel.from_local_checkpoint` ->
    `parse_fine_tuned_lora_name`), instead of vLLM's generic unexpected-modules list."""

    def _map_name_with_shard(self, key: str):
        result = super()._map_name_with_shard(key)
        if result is not None and LORA_TENSOR.search(key) and not ADAPTABLE.match(result[0]):
            module = LORA_TENSOR.sub("", canonical_name(key))
            raise unadaptable(module)
        return result


# the model class's hf_to_vllm_mapper: vLLM maps adapter names and the quantization config's target/ignore lists
# through it (`QuantizationConfig.apply_vllm_mapper`)
# (`cognica.weights.ENGINE_PREFIXES`, the prefixes `engine_name` maps, under any wrapper prefix)
LORA_NAMES = CognicaLoRANames(orig_to_new_regex={
    re.compile(rf"^{_WRAPPERS}{re.escape(old.removesuffix('.'))}(?=\.|$)"): new.removesuffix(".")
    for old, new in ENGINE_PREFIXES.items()
})


class CognicaLoRA:
    """What vLLM's `SupportsLoRA` asks of the model class, as its in-tree LlamaForCausalLM declares it: the fused
    QKV's parts and the two vocab tables LoRA may adapt."""

    packed_modules_mapping = {"qkv_proj": ["c_q", "c_k", "c_v"]}
    embedding_modules = {"wte": "input_embeddings", "lm_head": "output_embeddings"}
    hf_to_vllm_mapper = LORA_NAMES
