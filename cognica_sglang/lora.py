"""LoRA adapters on SGLang: nanochat-named PEFT adapters on every projection, `transformer.wte` and `lm_head`.

SGLang's LoRA code (sglang/srt/lora) knows a model only by Llama module names:
- `LoRAManager.init_lora_modules` wraps a per-layer module whose leaf name (or last two parts) is a target module
  and whose path has a layer id (`get_layer_id`: `layers\\.(\\d+)\\.`, which `eager_prefill_layers.N.` satisfies),
  a VocabParallelEmbedding only under a name containing `embed_tokens`, and a ParallelLMHead named `lm_head`;
- target modules are leaf names (`get_normalized_target_modules` keeps the last dotted part), and
  `LoRAMemoryPool.init_buffers` keeps one buffer per leaf name and layer, sized by the model's `get_hidden_dim`:
  attn.c_proj (n_embd -> n_embd) and mlp.c_proj (mlp_hidden -> n_embd) cannot share `c_proj`, and only the names in
  `ROW_PARALLELISM_LINEAR_LORA_NAMES` (`o_proj`, `down_proj`) get their A sharded by rows under tensor parallelism;
- `LoRAAdapter.normalize_qkv_proj` stacks an adapter's `q_proj`/`k_proj`/`v_proj` tensors into `qkv_proj` (it needs
  q and v), and `LoRAAdapter._process_weight` keeps a layer tensor only if its name has a layer id.
So, with LoRA on (and only then): `use_lora_module_names` registers wte / attn.c_proj / mlp.c_proj under
`embed_tokens` / `o_proj` / `down_proj` (the old attribute names stay readable, so `forward` is unchanged; mlp.c_fc
keeps its name, since `up_proj` would normalise to `gate_up_proj`), and four SGLang plugin hooks on LoRAManager
(`LORA_HOOKS`) rewrite each adapter's nanochat names to those: its config's target modules before
`validate_new_adapter`, its tensors before `load_lora_weights_from_tensors` (missing q/k/v parts filled with zeros),
where an adapter on a module LoRA cannot reach is refused with one line. `--lora-target-modules all` leaves out
mlp.c_fc (`auto_detect_lora_target_modules` keeps only SGLang's known names); adapters given by path are not
affected. Value embeddings, ve_gate and smear_gate are plain parameters or embeddings that
`should_apply_lora` never lets SGLang wrap.

On a machine without a CUDA driver SGLang 0.5.23's LoRA cannot start at all: its LoRA layers pin host tensors
(`torch.tensor(..., pin_memory=True)` in ColumnParallelLinearWithLoRA.__init__ and the other layers, and in
TorchNativeLoRABackend.prepare_lora_batch), which raises "Found no NVIDIA driver" (its in-tree LlamaForCausalLM
fails the same way). `check_lora_server_args` refuses that in the first process with the engine's reason.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cognica.names import canonical_name, padded_vocab
from cognica.weights import LORA_LAYER_MODULES, LORA_REACH, unadaptable

# module class name -> {attribute the model's code reads: name SGLang's LoRA code looks for}
LORA_MODULE_NAMES = {
    "CognicaModel": {"wte": "embed_tokens"},
    "CognicaAttention": {"c_proj": "o_proj"},
    "CognicaMLP": {"c_proj": "down_proj"},
}
# the core's per-layer LoRA modules (`cognica.weights.LORA_LAYER_MODULES`) -> the name SGLang's LoRA code reads
ADAPTER_LEAF = {"attn.c_q": "attn.q_proj", "attn.c_k": "attn.k_proj", "attn.c_v": "attn.v_proj",
                "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.down_proj"}
assert tuple(ADAPTER_LEAF) == LORA_LAYER_MODULES, "every adaptable layer module needs its SGLang name"
QKV_LEAVES = frozenset({"attn.q_proj", "attn.k_proj", "attn.v_proj"})  # stacked by SGLang into attn.qkv_proj
# what SGLang may wrap (LoRAManager.init_lora_modules asks `should_apply_lora` of every per-layer module)
SGLANG_ADAPTABLE = re.compile(r"^model\.[a-z_]*layers\.\d+\.(" + "|".join(sorted(
    {re.escape("attn.qkv_proj" if leaf in QKV_LEAVES else leaf) for leaf in ADAPTER_LEAF.values()})) + ")$")
# an adapter's nanochat module (after `canonical_name`) -> (layer, module) of the table
ADAPTER_MODULE = re.compile(r"^transformer\.h\.(\d+)\.(" + "|".join(map(re.escape, LORA_LAYER_MODULES)) + ")$")
# PEFT target_modules entries (leaf names; `c_proj` means both projections) -> SGLang target modules
TARGET_MODULES = {"c_q": ("q_proj",), "c_k": ("k_proj",), "c_v": ("v_proj",), "c_proj": ("o_proj", "down_proj"),
                  "attn.c_proj": ("o_proj",), "mlp.c_proj": ("down_proj",), "c_fc": ("c_fc",),
                  "wte": ("embed_tokens",), "lm_head": ("lm_head",)}
LORA_TENSOR = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")

_alias_classes: dict[type, type] = {}


def _alias_class(cls: type, names: dict[str, str]) -> type:
    """`cls` whose attributes `names` read the submodule registered under the new name (the LoRA wrapper, once
    SGLang's `replace_submodule` has set it)."""
    if cls not in _alias_classes:
        props = {old: property(lambda self, new=new: self._modules[new]) for old, new in names.items()}
        _alias_classes[cls] = type(cls.__name__, (cls,), {**props, "__module__": cls.__module__})
    return _alias_classes[cls]


def _register_under(module: nn.Module, names: dict[str, str]) -> None:
    if type(module) in _alias_classes.values():
        return  # already renamed
    mods = module._modules
    renamed = {names.get(k, k): v for k, v in mods.items() if not (k in names and names[k] in mods)}
    mods.clear()
    mods.update(renamed)
    module.__class__ = _alias_class(type(module), names)


class CognicaLoRAMixin:
    """What SGLang's LoRA manager asks of a model (`get_hidden_dim` in lora.utils.get_hidden_dim,
    `should_apply_lora` in LoRAManager.init_lora_modules), and the renaming it needs (`use_lora_module_names`)."""

    cfg: Any

    def get_hidden_dim(self, module_name: str, layer_idx: int) -> tuple[int, int]:
        """(input, output) width of a LoRA target module (stacked qkv: the three outputs together)."""
        cfg = self.cfg
        q, kv = cfg.n_head * cfg.head_dim, cfg.kv_dim
        dims = {"qkv_proj": (cfg.n_embd, q + 2 * kv), "o_proj": (q, cfg.n_embd),
                "c_fc": (cfg.n_embd, cfg.mlp_hidden), "down_proj": (cfg.mlp_hidden, cfg.n_embd),
                "embed_tokens": (padded_vocab(cfg), cfg.n_embd), "lm_head": (cfg.n_embd, padded_vocab(cfg))}
        if module_name not in dims:
            raise NotImplementedError(f"cognica: no LoRA target {module_name!r}; {LORA_REACH}")
        return dims[module_name]

    def should_apply_lora(self, module_name: str) -> bool:
        return bool(SGLANG_ADAPTABLE.match(module_name))

    def use_lora_module_names(self) -> None:
        """Register the adaptable modules under the names SGLang's LoRA code looks for (idempotent). Called before
        LoRAManager.init_state; the model's parameter names change with it (as they do under SGLang's LoRA
        wrappers, `...base_layer.weight`), so weights are not reloaded into a model serving LoRA."""
        assert isinstance(self, nn.Module)
        head = self._modules.get("head")
        if head is not None and head is self._modules.get("lm_head"):
            _register_under(self, {"head": "lm_head"})  # the head the logits processor reads follows lm_head
        for module in list(self.modules()):
            names = LORA_MODULE_NAMES.get(type(module).__name__)
            if names:
                _register_under(module, names)


def sglang_target_modules(targets: Any) -> Any:
    """A PEFT adapter's `target_modules` in SGLang's names (`all-linear` and regex strings stay as they are). An entry
    this model has no LoRA module for is dropped: the adapter's tensors decide the refusal, naming the module."""
    if isinstance(targets, str):
        return targets
    out: list[str] = []
    for t in targets:
        key = t if t in TARGET_MODULES else t.rsplit(".", 1)[-1]
        key = next((k for k in ("attn.c_proj", "mlp.c_proj") if t.endswith(k)), key)
        out += [m for m in TARGET_MODULES.get(key, ()) if m not in out]
    return out


def sglang_adapter_tensors(tensors: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """An adapter's tensors (PEFT names on nanochat modules, any wrapper prefix) in the names SGLang's LoRAAdapter
    reads; a layer with only some of c_q/c_k/c_v gets zero A and B for the others (SGLang stacks all three). Raises
    ValueError with one line for a LoRA tensor on a module LoRA cannot reach."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    for key, w in tensors.items():
        m = LORA_TENSOR.search(key)
        if m is None:
            out[key] = w  # not a LoRA tensor: SGLang ignores what matches no target
            continue
        module, suffix = canonical_name(key[:m.start()]).removeprefix("base_model.model."), m[1]
        module = canonical_name(module)
        layer = ADAPTER_MODULE.match(module)
        if layer:
            name = f"model.layers.{layer[1]}.{ADAPTER_LEAF[layer[2]]}.{suffix}"
            if layer[2] in ("attn.c_q", "attn.c_k", "attn.c_v"):
                qkv.setdefault(int(layer[1]), {})[f"{layer[2][-1]}.{suffix[5]}"] = w
        elif module == "transformer.wte":
            name = f"model.embed_tokens.{suffix}"
        elif module == "lm_head" and getattr(model, "head", None) is getattr(model, "lm_head", None):
            name = f"lm_head.{suffix}"
        elif module == "lm_head":
            raise ValueError("cognica: a LoRA adapter targets lm_head, which the Log-OP head (poe_head='logop') "
                             "reads per stage without SGLang's LoRA wrapper; serve it without poe_head='logop'")
        else:
            raise unadaptable(module)
        out[name] = w
    q_out, kv_out = cfg.n_head * cfg.head_dim, cfg.kv_dim
    for i, parts in qkv.items():
        r = next(w.shape[0] for k, w in parts.items() if k.endswith(".A"))
        for p, n_out in (("q", q_out), ("k", kv_out), ("v", kv_out)):
            for ab, shape in (("A", (r, cfg.n_embd)), ("B", (n_out, r))):
                name = f"model.layers.{i}.attn.{p}_proj.lora_{ab}.weight"
                out.setdefault(name, torch.zeros(shape, dtype=next(iter(parts.values())).dtype))
    return out


def read_adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (or Hugging Face repo id), as SGLang's loader reads them."""
    from safetensors.torch import load_file

    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download

        path = snapshot_download(path, allow_patterns=["*.safetensors", "*.bin", "*.json"])
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(glob.glob(os.path.join(path, "*.bin")))
    if not files:
        raise ValueError(f"cognica: no adapter weights (*.safetensors, *.bin) in {path}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _is_cognica(manager: Any) -> bool:
    return isinstance(getattr(manager, "base_model", None), CognicaLoRAMixin)


def _before_init_state(manager: Any, *args: Any, **kwargs: Any) -> None:
    if _is_cognica(manager):
        manager.base_model.use_lora_module_names()


def _before_validate_new_adapter(manager: Any, lora_config: Any, *args: Any, **kwargs: Any) -> None:
    if _is_cognica(manager):
        lora_config.target_modules = sglang_target_modules(lora_config.target_modules)
        lora_config.hf_config["target_modules"] = lora_config.target_modules


def _around_load_lora_weights(original: Callable, manager: Any, lora_ref: Any, *args: Any, **kwargs: Any) -> Any:
    if not _is_cognica(manager):
        return original(manager, lora_ref, *args, **kwargs)
    # read here, so the tensors reach SGLang's adapter through its from-tensors path, renamed by the hook below
    tensors = read_adapter_tensors(manager.configs[lora_ref.lora_id].path)
    return manager.load_lora_weights_from_tensors(lora_ref, tensors)


def _before_load_lora_weights_from_tensors(manager: Any, lora_ref: Any, tensors: dict, *args: Any, **kwargs: Any):
    if _is_cognica(manager):
        return (manager, lora_ref, sglang_adapter_tensors(tensors, manager.base_model), *args), kwargs
    return None


_MANAGER = "sglang.srt.lora.lora_manager.LoRAManager."
# (target, hook, HookType name), registered by cognica_sglang.register
LORA_HOOKS = [
    (_MANAGER + "init_state", _before_init_state, "BEFORE"),
    (_MANAGER + "validate_new_adapter", _before_validate_new_adapter, "BEFORE"),
    (_MANAGER + "load_lora_weights", _around_load_lora_weights, "AROUND"),
    (_MANAGER + "load_lora_weights_from_tensors", _before_load_lora_weights_from_tensors, "BEFORE"),
]


def check_lora_server_args(view: Any) -> None:
    """First-process refusals for `--enable-lora` / `--lora-paths` (a failure in the scheduler only kills the
    engine): no CUDA driver (SGLang's LoRA layers pin host memory), and a Triton LoRA backend on CPU."""
    from cognica_sglang.config_checks import serves_on_cpu

    if not serves_on_cpu(view.device):
        return
    try:
        torch.empty(1, pin_memory=True)
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            "cognica: SGLang cannot serve LoRA adapters on this machine: SGLang 0.5.23's LoRA layers pin host memory "
            "(pin_memory=True in ColumnParallelLinearWithLoRA and the other lora.layers, and in the torch_native "
            f"backend), and pinning fails here ({reason}); its in-tree Llama fails the same way. vLLM serves them "
            "on CPU: vllm serve DIR --enable-lora --lora-modules NAME=ADAPTER") from None
    if getattr(view, "lora_backend", None) != "torch_native":
        raise ValueError(f"cognica: --lora-backend {view.lora_backend} runs Triton kernels, which a CPU does not "
                         "have; on CPU pass --lora-backend torch_native")
