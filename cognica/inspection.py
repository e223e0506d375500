"""`cognica inspect`'s library: validate a checkpoint directory and say what it is, what the engines need and what
is wrong, one line per problem, never a traceback.

It only reads: it parses every safetensors header, reads the five scalar tensors, unpickles tokenizer.pkl through
the restricted unpickler and loads token_bytes.pt with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cognica.config import ARCHITECTURE, ARCHITECTURE_ALIASES, MODEL_TYPE, CognicaConfig, ConfigError

ENGINE_OVERRIDES = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE}


@dataclass
class InspectReport:
    """What `cognica inspect` found: facts about the checkpoint, what the engines need, what is wrong."""

    path: str
    facts: dict[str, Any] = field(default_factory=dict)
    needs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# Where one problem ends and the next begins in `prefix: a; b`: the next starts with a field or tensor head.
_NEXT_PROBLEM = re.compile(r"; (?=[A-Za-z_/]+: |tensor |missing |unexpected )")


def _split(message: str) -> list[str]:
    """Our errors join several problems as `prefix: a; b`; report them one per line."""
    head, sep, rest = message.partition(": ")
    parts = _NEXT_PROBLEM.split(rest) if sep else []
    if len(parts) < 2 or head not in ("bad config", "checkpoint does not match config.json"):
        return [message]
    return [f"{head}: {p}" for p in parts]


def _read_config(root: Path, report: InspectReport) -> CognicaConfig | None:
    path = root / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.problems.append("config.json: missing")
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        report.problems.append(f"config.json: not valid JSON ({e})")
        return None
    if not isinstance(raw, dict):
        report.problems.append(f"config.json: must be a JSON object, got {type(raw).__name__}")
        return None
    archs, model_type = raw.get("architectures"), raw.get("model_type")
    arch_ok = isinstance(archs, list) and any(a in ARCHITECTURE_ALIASES for a in archs if isinstance(a, str))
    if not arch_ok or model_type != MODEL_TYPE:
        found = f"architectures={archs!r}, model_type={model_type!r}"
        report.needs.append(
            f"config.json has {found}, which the plugins do not register: pass"
            f" --hf-overrides '{json.dumps(ENGINE_OVERRIDES)}' to vLLM and"
            f" --json-model-override-args '{json.dumps(ENGINE_OVERRIDES)}' to SGLang"
        )
    try:
        cfg = CognicaConfig.from_dict(raw)
    except ConfigError as e:
        report.problems += _split(str(e))
        return None
    report.facts["architecture"] = (
        f"nanochat GPT; config.json says architectures={archs!r}, model_type={model_type!r}, poe_mode={cfg.poe_mode!r}"
    )
    if cfg.extra:
        report.notes.append(f"config fields unknown to cognica (kept, not used): {', '.join(sorted(cfg.extra))}")
    return cfg


def _check_weights(root: Path, cfg: CognicaConfig | None, report: InspectReport) -> None:
    from cognica.checkpoint import Checkpoint, check_finite, read_entries, validate_entries, weight_files
    from cognica.names import SCALAR_NAMES, CheckpointError

    try:
        files = weight_files(root)
        stored = read_entries(files)
    except CheckpointError as e:
        report.problems.append(str(e))
        return
    report.facts["files"] = [f"{p.name} ({p.stat().st_size:,} bytes)" for p in files]
    report.facts["tensors"] = len(stored)
    report.facts["dtype"] = ", ".join(sorted({e.dtype for e in stored.values()})) or "none"
    if cfg is None:
        return
    try:
        ckpt = Checkpoint(root, cfg, validate_entries(cfg, stored))
    except CheckpointError as e:
        report.problems += _split(str(e))
        return
    report.facts["params"] = f"{ckpt.num_params:,}"
    for name in SCALAR_NAMES:
        try:
            check_finite(name, ckpt.tensor(name))
        except CheckpointError as e:
            report.problems.append(str(e))
        except Exception as e:  # safetensors' own reader on a file our header check accepted
            report.problems.append(f"tensor {name!r}: unreadable ({type(e).__name__}: {e})")


def _check_tokenizer(root: Path, cfg: CognicaConfig | None, report: InspectReport) -> None:
    from cognica.tokenizer import TokenizerError, load_tiktoken_pickle

    pkl, tjson, tbytes = root / "tokenizer.pkl", root / "tokenizer.json", root / "token_bytes.pt"
    n_vocab = None
    if pkl.exists():
        try:
            enc = load_tiktoken_pickle(pkl)
            n_vocab = enc.n_vocab
            report.facts.setdefault("tokenizer", []).append(f"tokenizer.pkl (tiktoken Encoding, {n_vocab} tokens)")
        except TokenizerError as e:
            report.problems.append(f"tokenizer.pkl: {e}")
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # tiktoken's Rust core panics (pyo3 PanicException is a BaseException)
            first = str(e).splitlines()[0] if str(e) else ""
            report.problems.append(f"tokenizer.pkl: rejected while building the Encoding ({type(e).__name__}: {first})")
    if tjson.exists():
        try:
            from tokenizers import Tokenizer

            n_vocab = Tokenizer.from_file(str(tjson)).get_vocab_size(with_added_tokens=True)
            report.facts.setdefault("tokenizer", []).append(f"tokenizer.json ({n_vocab} tokens)")
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            report.problems.append(f"tokenizer.json: unreadable ({e})")
    elif pkl.exists():
        report.notes.append("no tokenizer.json: the engines and transformers convert tokenizer.pkl on first load"
                            " (restricted unpickler, cached outside this directory); to write tokenizer.json here"
                            f" instead, run `cognica convert-tokenizer {root}` once")
    else:
        report.problems.append("tokenizer.pkl: missing, and there is no tokenizer.json either")
    if n_vocab is not None and cfg is not None and n_vocab > cfg.vocab_size:
        report.problems.append(f"tokenizer: {n_vocab} tokens but config vocab_size is {cfg.vocab_size}")
    if tbytes.exists():
        _check_token_bytes(tbytes, cfg.vocab_size if cfg is not None else n_vocab, report)


def _check_token_bytes(path: Path, vocab: int | None, report: InspectReport) -> None:
    import torch

    try:
        t = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt or non-tensor file; weights_only refuses code
        msg = str(e)
        refused = re.search(r"GLOBAL (\S+)", msg)
        if "Weights only load failed" in msg and refused:
            report.problems.append(f"token_bytes.pt: refused: it references {refused.group(1)}, not only a tensor")
        else:
            first = msg.splitlines()[0][:200] if msg else ""
            report.problems.append(f"token_bytes.pt: unreadable ({type(e).__name__}: {first})")
        return
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_floating_point():
        what = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        report.problems.append(f"token_bytes.pt: expected a 1-D integer tensor, found {what}")
    elif vocab is not None and t.numel() != vocab:
        report.problems.append(f"token_bytes.pt: expected length {vocab} (vocab size), found {t.numel()}")


def inspect_checkpoint(model_dir: str | os.PathLike[str]) -> InspectReport:
    """Validate a checkpoint directory without writing anything; every problem becomes one line."""
    from cognica.checkpoint import check_directory
    from cognica.names import CheckpointError

    report = InspectReport(str(model_dir))
    try:
        root = check_directory(model_dir)
    except CheckpointError as e:
        report.problems.append(str(e))
        return report
    cfg = _guarded("config.json", report, _read_config, root, report)
    if cfg is not None:
        letters = cfg.window_letters
        report.facts.update(
            layers=cfg.n_layer,
            width=cfg.n_embd,
            heads=f"{cfg.n_head} query, {cfg.n_kv_head} KV, head_dim {cfg.head_dim}",
            vocab=cfg.vocab_size,
            context=cfg.sequence_len,
            windows=" ".join(letters) + f" (S = {cfg.short_window} keys before the query, L = {cfg.sequence_len})",
            value_embedding_layers=", ".join(map(str, cfg.ve_layers)),
            backout_layer=cfg.backout_layer,
        )
    _guarded("weights", report, _check_weights, root, cfg, report)
    _guarded("tokenizer", report, _check_tokenizer, root, cfg, report)
    return report


def _guarded(stage: str, report: InspectReport, check: Callable[..., Any], *args: Any) -> Any:
    """Run one stage of the inspection; an error nobody anticipated becomes a problem line, not a traceback."""
    try:
        return check(*args)
    except Exception as e:
        report.problems.append(f"{stage}: unexpected {type(e).__name__} while checking: {e}")
        return None


def format_report(report: InspectReport) -> str:
    lines = [f"checkpoint: {report.path}"]
    lines += [f"  {k.replace('_', ' ')}: {', '.join(v) if isinstance(v, list) else v}" for k, v in report.facts.items()]
    if report.notes:
        lines += ["notes:"] + [f"  {n}" for n in report.notes]
    if report.needs:
        lines += ["the engines need:"] + [f"  {n}" for n in report.needs]
    if report.problems:
        lines += [f"{len(report.problems)} problem(s):"] + [f"  error: {p}" for p in report.problems]
    else:
        lines.append("ok: no problems found")
    return "\n".join(lines)
