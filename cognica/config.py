"""The Cognica (nanochat) config: one frozen dataclass, parsed from nanochat- or HF-style fields.

The published `config.json` is written by a remote-code config class we never run, so its exact
field names are unknown: accept nanochat names (`n_layer`, `n_embd`, ...) and HF aliases
(`num_hidden_layers`, `hidden_size`, ...), refuse contradictions, and keep unknown fields so that
`cognica inspect` can show them. Everything per-layer is derived here, once.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "cognica_poe"
# The architecture string our factory writes; the plugins also register the other spellings.
ARCHITECTURE = "CognicaPoEForCausalLM"
ARCHITECTURE_ALIASES = (
    "CognicaPoEForCausalLM",
    "CognicaForCausalLM",
    "CognicaBPForCausalLM",
    "CognicaPoEModel",
    "CognicaPoELMHeadModel",
    "NanoChatForCausalLM",
    "GPT",
)

ROPE_BASE = 100_000.0  # nanochat a825e63 `_precompute_rotary_embeddings(base=100000)`
QK_NORM_SCALE = 1.2  # q, k = norm(q) * 1.2, norm(k) * 1.2 ("sharper attention")
LOGIT_SOFTCAP = 15.0  # logits = 15 * tanh(logits / 15)
SMEAR_CHANNELS = 24  # smear_gate reads x[..., :24]
VE_GATE_CHANNELS = 12  # ve_gate reads h[..., :12]
VE_GATE_SCALE = 3.0  # gate = 3 * sigmoid(ve_gate(...)) in (0, 3)
WINDOW_TILE = 128  # S windows are rounded up to FA3's tile size
POE_MODES = ("none", "flat")
POE_HEADS = ("final", "logop")  # logop: mean over the stage ends of log_softmax(softcap(lm_head(norm(h_e))))
POE_EVERY = 6  # layers per PoE stage in the release (the published PoE config carries poe_every=6)

# canonical field -> accepted spellings (first is the nanochat name)
_ALIASES: dict[str, tuple[str, ...]] = {
    "n_layer": ("n_layer", "num_hidden_layers", "num_layers"),
    "n_head": ("n_head", "num_attention_heads"),
    "n_kv_head": ("n_kv_head", "num_key_value_heads"),
    "n_embd": ("n_embd", "hidden_size", "d_model"),
    "vocab_size": ("vocab_size",),
    "sequence_len": ("sequence_len", "max_position_embeddings", "max_seq_len", "n_positions"),
    "window_pattern": ("window_pattern",),
    "poe_mode": ("poe_mode",),
    "poe_every": ("poe_every",),
    "poe_exit_stage": ("poe_exit_stage",),
    "poe_head": ("poe_head",),
    "poe_force": ("poe_force",),
}
_REQUIRED = ("n_layer", "n_head", "n_embd", "vocab_size", "sequence_len")
# Fields transformers or our own HF config class add; never reported as unknown.
_KNOWN_HF_FIELDS = frozenset(
    {
        "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "auto_map",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim",
        "intermediate_size", "rope_theta", "rope_parameters", "rope_scaling", "hidden_act",
        "final_logit_softcapping", "use_cache", "is_hybrid_swa", "hybrid_layer_pattern",
        "sliding_window_size", "layer_types", "n_stages", "stage_layers", "_name_or_path",
        "name_or_path", "return_dict", "output_hidden_states", "output_attentions", "chunk_size_feed_forward",
        "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class", "task_specific_params",
        "qk_norm_scale", "logit_softcap", "rope_base", "window_left",
    }
)


class ConfigError(ValueError):
    """A config.json that cannot describe this architecture; the message names every bad field."""


@dataclass(frozen=True)
class CognicaConfig:
    n_layer: int = 24
    n_head: int = 12  # query heads
    n_kv_head: int = 12  # key/value heads (MHA in the release; GQA allowed)
    n_embd: int = 1536
    vocab_size: int = 32768  # padded; tokenizer ids stop at 32767
    sequence_len: int = 2048  # training context; also the L window (keys before the query)
    window_pattern: str = "SSSL"  # tiled over layers; S = short window, L = long; last layer forced to L
    poe_mode: str = "none"  # "flat" on the PoE twin: every stage end was trained to predict through lm_head
    poe_every: int = POE_EVERY  # layers per stage: stages end after layers 5, 11, 17, 23 of the release
    poe_exit_stage: int | None = None  # 1..n_stages: build layers 0..poe_every*k-1 and predict there; None = all
    poe_head: str = "final"  # "final" (the last built layer) or "logop" (mean of the stage-end log-probs)
    poe_force: bool = False  # allow stage exits / logop on a poe_mode="none" (BP) checkpoint
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        _validate(self)

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return 4 * self.n_embd

    @property
    def short_window(self) -> int:
        """S window in keys before the query: ceil(ceil(sequence_len / 4) / 128) * 128 (512 at 2048)."""
        return math.ceil(math.ceil(self.sequence_len / 4) / WINDOW_TILE) * WINDOW_TILE

    @property
    def window_letters(self) -> str:
        """One letter per layer: the pattern tiled over the layers, the last layer forced to L."""
        tiled = "".join(self.window_pattern[i % len(self.window_pattern)] for i in range(self.n_layer))
        return tiled[:-1] + "L"

    @property
    def window_left(self) -> tuple[int, ...]:
        """Keys before the query each layer sees (nanochat/flash-attn `window_size[0]`, SGLang units)."""
        return tuple(self.short_window if c == "S" else self.sequence_len for c in self.window_letters)

    @property
    def window_keys(self) -> tuple[int, ...]:
        """Keys each layer sees, the query included (vLLM / HF `sliding_window` units)."""
        return tuple(w + 1 for w in self.window_left)

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """True where a layer's window is shorter than the context, i.e. where the KV can be trimmed."""
        return tuple(c == "S" for c in self.window_letters)

    @property
    def ve_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layer) if has_ve(i, self.n_layer))

    @property
    def backout_layer(self) -> int:
        """x_backout is the residual stream right after this block (nanochat: n_layer // 2)."""
        return self.n_layer // 2

    # ---- PoE stages ---------------------------------------------------------------------
    @property
    def n_stages(self) -> int:
        return self.n_layer // self.poe_every

    @property
    def stage_ends(self) -> tuple[int, ...]:
        """Layer indices after which each stage ends (5, 11, 17, 23 for the release)."""
        return tuple((s + 1) * self.poe_every - 1 for s in range(self.n_stages))

    @property
    def n_active_layers(self) -> int:
        """Layers actually built: poe_every * poe_exit_stage for a stage prefix, else all of them."""
        return self.n_layer if self.poe_exit_stage is None else self.poe_every * self.poe_exit_stage

    @property
    def active_stage_ends(self) -> tuple[int, ...]:
        """The stage ends among the built layers: the heads the Log-OP head averages."""
        return tuple(e for e in self.stage_ends if e < self.n_active_layers)

    @property
    def readout_layers(self) -> tuple[int, ...]:
        """The layers whose residual stream the head reads: every built stage end (the Log-OP head) or the last
        built layer (the final head, also of a stage prefix)."""
        return self.active_stage_ends if self.poe_head == "logop" else (self.n_active_layers - 1,)

    def local_kv_heads(self, tp_size: int, tp_rank: int) -> range:
        """The KV heads a tensor-parallel rank holds, as the engines' QKVParallelLinear shards them: partitioned
        when n_kv_head >= tp_size, else each head replicated over tp_size // n_kv_head ranks."""
        if self.n_kv_head >= tp_size:
            per = self.n_kv_head // tp_size
            return range(tp_rank * per, (tp_rank + 1) * per)
        first = tp_rank // (tp_size // self.n_kv_head)
        return range(first, first + 1)

    @property
    def uses_stages(self) -> bool:
        """True when the forward reads an intermediate stage (a prefix exit or the Log-OP head)."""
        return self.n_active_layers < self.n_layer or self.poe_head == "logop"

    def is_built(self, canonical_name: str) -> bool:
        """Whether a stage prefix builds (and loads) this tensor: every layer tensor and value-embedding table of
        layers >= n_active_layers is skipped; embeddings, lm_head and the scalars are shared by all stages."""
        layer = tensor_layer(canonical_name)
        return layer is None or layer < self.n_active_layers

    def exit_backout(self, e: int) -> bool:
        """True iff an exit right after layer `e` subtracts the backout: x_backout is stored after block
        `backout_layer` (12 in the release), so exits after layers 5 and 11 have none, and later exits
        follow the final layer's tail (x - backout_lambda * x_backout). The card does not say; this is our choice."""
        return e >= self.backout_layer

    @property
    def num_params(self) -> int:
        d, v, L = self.n_embd, self.vocab_size, self.n_layer
        per_layer = 2 * d * d + 2 * d * self.kv_dim + 2 * d * self.mlp_hidden
        ve = len(self.ve_layers) * (v * self.kv_dim + VE_GATE_CHANNELS * self.n_kv_head)
        scalars = 2 * L + SMEAR_CHANNELS + 2
        return 2 * v * d + L * per_layer + ve + scalars

    # ---- parsing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> CognicaConfig:
        """Parse nanochat- or HF-style fields; raise ConfigError naming every missing or conflicting one."""
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        values: dict[str, Any] = {}
        problems: list[str] = []
        used: set[str] = set()
        for name, spellings in _ALIASES.items():
            found = {s: raw[s] for s in spellings if s in raw and raw[s] is not None}
            used.update(s for s in spellings if s in raw)
            distinct = {json.dumps(v, sort_keys=True) for v in found.values()}
            if len(distinct) > 1:
                problems.append(f"{name}: conflicting values {found}")
            elif found:
                values[name] = next(iter(found.values()))
        for name in _REQUIRED:
            if name not in values and not any(name in p for p in problems):
                problems.append(f"{name}: missing (accepted spellings: {', '.join(_ALIASES[name])})")
        if "n_kv_head" not in values and "n_head" in values:
            values["n_kv_head"] = values["n_head"]
        if problems:
            raise ConfigError("bad config: " + "; ".join(problems))
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len"):
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    values[name] = int(v)
                else:
                    problems.append(f"{name}: must be an integer, got {v!r}")
        for name in ("window_pattern", "poe_mode", "poe_head"):
            if name in values and not isinstance(values[name], str):
                problems.append(f"{name}: must be a string, got {values[name]!r}")
        for name in ("poe_every", "poe_exit_stage"):
            v = values.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                if isinstance(v, float) and v.is_integer():
                    values[name] = int(v)
                else:
                    problems.append(f"{name}: must be an integer, got {v!r}")
        if "poe_force" in values and not isinstance(values["poe_force"], bool):
            problems.append(f"poe_force: must be true or false, got {values['poe_force']!r}")
        if problems:
            raise ConfigError("bad config: " + "; ".join(problems))
        if "window_pattern" in values:
            values["window_pattern"] = values["window_pattern"].upper()  # nanochat upper-cases it too
        extra = {k: v for k, v in raw.items() if k not in used and k not in _KNOWN_HF_FIELDS}
        _check_head_dim_field(raw, values)
        return cls(**values, extra=extra)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CognicaConfig:
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config.json not found: {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config.json is not valid JSON ({path}): {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The nanochat fields plus the HF aliases engines read, as our factory writes them."""
        return {
            "architectures": [ARCHITECTURE],
            "model_type": MODEL_TYPE,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_kv_head": self.n_kv_head,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "sequence_len": self.sequence_len,
            "window_pattern": self.window_pattern,
            "poe_mode": self.poe_mode,
            **{name: getattr(self, name) for name, default in _POE_DEFAULTS.items() if getattr(self, name) != default},
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "hidden_size": self.n_embd,
            "max_position_embeddings": self.sequence_len,
            "torch_dtype": "bfloat16",
            # as the published config carries it: remote code we never run (no trust_remote_code needed)
            "auto_map": {"AutoConfig": "configuration_cognica_poe.CognicaPoEConfig",
                         "AutoModelForCausalLM": "modeling_cognica_poe.CognicaPoEForCausalLM"},
        }


# serve-time PoE options: written to config.json only when not at their default
_POE_DEFAULTS: dict[str, Any] = {"poe_every": POE_EVERY, "poe_exit_stage": None, "poe_head": "final",
                                 "poe_force": False}


def tensor_layer(canonical_name: str) -> int | None:
    """The layer index of `transformer.h.{i}.*` and `value_embeds.{i}.*` tensors; None for shared tensors."""
    for prefix in ("transformer.h.", "value_embeds."):
        if canonical_name.startswith(prefix):
            head = canonical_name[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head)
    return None


def has_ve(i: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last layer always included (nanochat `has_ve`)."""
    return i % 2 == (n_layer - 1) % 2


def _check_head_dim_field(raw: dict[str, Any], values: dict[str, Any]) -> None:
    hd = raw.get("head_dim")
    if hd is not None and values["n_embd"] // max(values["n_head"], 1) != hd:
        raise ConfigError(
            f"head_dim: config says {hd} but n_embd/n_head = {values['n_embd']}/{values['n_head']}"
            " (this architecture has head_dim = n_embd // n_head)"
        )


def _validate(cfg: CognicaConfig) -> None:
    problems = []
    for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "sequence_len"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name}: must be positive, got {getattr(cfg, name)}")
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    if cfg.n_embd % cfg.n_head:
        problems.append(f"n_embd/n_head: {cfg.n_embd} is not divisible by {cfg.n_head} heads")
    elif cfg.head_dim % 2:
        problems.append(f"n_embd/n_head: head_dim {cfg.head_dim} must be even for rotary")
    if cfg.n_kv_head > cfg.n_head or cfg.n_head % cfg.n_kv_head:
        problems.append(f"n_kv_head: {cfg.n_kv_head} KV heads must divide the {cfg.n_head} query heads")
    if cfg.n_embd < SMEAR_CHANNELS:
        problems.append(f"n_embd: {cfg.n_embd} is below the {SMEAR_CHANNELS} channels the smear gate reads")
    if not cfg.window_pattern:
        problems.append("window_pattern: empty")
    else:
        bad = sorted(set(cfg.window_pattern) - {"S", "L"})
        if bad:
            problems.append(f"window_pattern: unknown letter(s) {bad} in {cfg.window_pattern!r}; use S and L")
    if cfg.poe_mode not in POE_MODES:
        problems.append(f"poe_mode: {cfg.poe_mode!r} is not one of {POE_MODES}")
    if problems:
        raise ConfigError("bad config: " + "; ".join(problems))
    _validate_poe(cfg)


def _validate_poe(cfg: CognicaConfig) -> None:
    """Stage options: one clear message for the first thing that cannot be served."""
    if cfg.poe_head not in POE_HEADS:
        raise ConfigError(f"bad config: poe_head: {cfg.poe_head!r} is not one of {POE_HEADS}")
    if cfg.poe_every <= 0:
        raise ConfigError(f"bad config: poe_every: must be positive, got {cfg.poe_every}")
    stage_mode = cfg.poe_exit_stage is not None or cfg.poe_head == "logop"
    if not stage_mode:
        return
    if cfg.n_layer % cfg.poe_every:
        raise ConfigError(
            f"bad config: poe_every: {cfg.poe_every} does not divide the {cfg.n_layer} layers, so the model has no"
            " stage ends for poe_exit_stage / poe_head='logop'"
        )
    if cfg.poe_exit_stage is not None and not 1 <= cfg.poe_exit_stage <= cfg.n_stages:
        raise ConfigError(
            f"bad config: poe_exit_stage: {cfg.poe_exit_stage} is out of range; this model has stages 1..{cfg.n_stages}"
            f" ({cfg.poe_every} layers each; {cfg.n_stages} = the full model)"
        )
    if cfg.poe_mode == "none" and cfg.uses_stages and not cfg.poe_force:
        what = f"poe_exit_stage={cfg.poe_exit_stage}" if cfg.n_active_layers < cfg.n_layer else "poe_head='logop'"
        raise ConfigError(
            f"bad config: {what}: the intermediate layers of a poe_mode='none' (BP) checkpoint are not trained as"
            " predictors; set poe_force=true to override"
        )
