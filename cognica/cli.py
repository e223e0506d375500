"""`cognica` command line: thin argparse subcommands over the library.

    cognica inspect DIR [--json]               validate a checkpoint directory and say what the engines need
    cognica convert-tokenizer DIR [--out OUT]  tokenizer.pkl -> tokenizer.json (restricted unpickler)
    cognica make-checkpoint OUT --preset tiny|small|full --seed N [--dtype]
    cognica bpb DIR --engine reference|vllm|sglang --text FILE [--max-tokens N] [--dtype]
        [--poe-exit-stage K] [--poe-head final|logop] [--poe-force]

DIR may also be a Hugging Face repo id (`cognica/Cognica-BP-v1.0-1.3B-base`), resolved through huggingface_hub's
cache (downloaded unless HF_HUB_OFFLINE=1; never the repo's *.py).

`inspect` only reads: it parses every safetensors header itself, reads the five scalar tensors, unpickles
tokenizer.pkl through the restricted unpickler and loads token_bytes.pt with `weights_only=True`. A bad
checkpoint gives one line per problem and exit code 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    from cognica.checkpoint import (
        SCALAR_NAMES,
        Checkpoint,
        CheckpointError,
        check_finite,
        read_safetensors_header,
        validate_entries,
        weight_files,
    )

    try:
        files = weight_files(root)
        stored = {}
        for path in files:
            for name, entry in read_safetensors_header(path).items():
                if name in stored:
                    raise CheckpointError(f"tensor {name!r} appears in both {stored[name].file.name} and {path.name}")
                stored[name] = entry
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
    from cognica.checkpoint import CheckpointError, check_directory

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


# ---------------------------------------------------------------------------------------------------------
# subcommands


def _local_dir(name: str) -> Path | None:
    """A directory as is, a Hugging Face repo id as its snapshot (cognica.hub); None after printing why not."""
    from cognica.hub import HubError, resolve

    try:
        return resolve(name)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def cmd_inspect(args: argparse.Namespace) -> int:
    root = _local_dir(args.dir)
    if root is None:
        return 1
    report = inspect_checkpoint(root)
    if str(root) != args.dir:
        report.path = f"{args.dir} (snapshot {root})"
    print(json.dumps(asdict(report) | {"ok": report.ok}, indent=2) if args.json else format_report(report))
    return 0 if report.ok else 1


def cmd_convert_tokenizer(args: argparse.Namespace) -> int:
    from cognica.tokenizer import TokenizerError, convert_tokenizer

    try:
        out = convert_tokenizer(args.dir, args.out)
    except (TokenizerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote tokenizer.json, tokenizer_config.json and special_tokens_map.json to {out}")
    return 0


def cmd_make_checkpoint(args: argparse.Namespace) -> int:
    import torch

    from cognica.factory import make_checkpoint

    out = make_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=getattr(torch, args.dtype),
                          progress=True)
    print(f"wrote a {args.preset} checkpoint (seed {args.seed}, {args.dtype}) to {out}")
    return 0


def cmd_bpb(args: argparse.Namespace) -> int:
    from cognica.bpb import EngineUnavailable, evaluate_bpb, poe_overrides
    from cognica.checkpoint import CheckpointError
    from cognica.tokenizer import TokenizerError

    try:
        text = sys.stdin.read() if args.text == "-" else Path(args.text).read_text(encoding="utf-8")
        root = _local_dir(args.dir)
        if root is None:
            return 1
        overrides = poe_overrides(args.poe_exit_stage, args.poe_head, args.poe_force)
        result = evaluate_bpb(str(root), text, engine=args.engine, max_tokens=args.max_tokens, dtype=args.dtype,
                              overrides=overrides)
    except EngineUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, TokenizerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"bpb {result.bpb:.6f} ({result.tokens} tokens, {result.bytes} bytes, {result.windows} window(s),"
          f" engine {args.engine}, {args.dtype}{''.join(f', {k}={v}' for k, v in overrides.items())})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cognica", description="Cognica (nanochat) checkpoints for vLLM and SGLang")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="validate a checkpoint directory and say what the engines need")
    s.add_argument("dir")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("convert-tokenizer", help="convert tokenizer.pkl to tokenizer.json (no code from the pickle)")
    s.add_argument("dir")
    s.add_argument("--out", default=None, help="output directory (default: DIR)")
    s.set_defaults(func=cmd_convert_tokenizer)

    s = sub.add_parser("make-checkpoint", help="write a random checkpoint in the published layout")
    s.add_argument("out")
    s.add_argument("--preset", choices=("tiny", "small", "full"), default="tiny")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    s.set_defaults(func=cmd_make_checkpoint)

    s = sub.add_parser("bpb", help="bits per byte of a text under the model")
    s.add_argument("dir")
    s.add_argument("--engine", choices=("reference", "vllm", "sglang"), default="reference")
    s.add_argument("--text", required=True, help="UTF-8 text file ('-' for stdin)")
    s.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    s.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    s.add_argument("--poe-exit-stage", type=int, default=None, metavar="K",
                   help="PoE stage prefix: score with layers of stages 1..K only (K = n_stages: the full model)")
    s.add_argument("--poe-head", choices=("final", "logop"), default=None,
                   help="final (default) or logop: the mean of the stage-end log-probabilities")
    s.add_argument("--poe-force", action="store_true",
                   help="allow stage modes on a poe_mode='none' (BP) checkpoint (intermediate layers untrained)")
    s.set_defaults(func=cmd_bpb)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
