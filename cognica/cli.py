"""`cognica` command line: thin argparse subcommands over the library.

    cognica inspect DIR [--json]               validate a checkpoint directory and say what the engines need
    cognica convert-tokenizer DIR [--out OUT]  tokenizer.pkl -> tokenizer.json (restricted unpickler)
    cognica make-checkpoint OUT --preset tiny|small|full --seed N [--dtype]
    cognica bpb DIR --engine reference|vllm|sglang --text FILE [--max-tokens N] [--dtype]
        [--poe-exit-stage K] [--poe-head final|logop] [--poe-force]

DIR may also be a Hugging Face repo id (`cognica/Cognica-BP-v1.0-1.3B-base`), resolved through huggingface_hub's
cache (downloaded unless HF_HUB_OFFLINE=1; never the repo's *.py).

`inspect` only reads (`cognica.inspection`): a bad checkpoint gives one line per problem and exit code 1, never a
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from cognica.config import ConfigError
from cognica.inspection import format_report, inspect_checkpoint


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
    from cognica.names import CheckpointError
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


def cmd_chat_template(args: argparse.Namespace) -> int:
    from cognica.chat import TEMPLATE_PATH, chat_template

    print(chat_template() if args.print else TEMPLATE_PATH)
    return 0


def cmd_sglang_cpu_path(args: argparse.Namespace) -> int:
    """Print the folder with the SGLang plugin's CPU stand-in for `sgl_kernel` (the `cognica.paths` entry point
    `sglang-cpu`, so the core names no plugin module); exit 2 where the plugin is not installed."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="cognica.paths") if ep.name == "sglang-cpu"]
    if not found:
        print("cognica: no 'cognica.paths' entry point 'sglang-cpu': install this package into the SGLang venv",
              file=sys.stderr)
        return 2
    print(found[0].load()())
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

    s = sub.add_parser("chat-template", help="the path of the opt-in nanochat chat template (for SFT checkpoints)")
    s.add_argument("--print", action="store_true", help="print the template instead of its path")
    s.set_defaults(func=cmd_chat_template)

    s = sub.add_parser("sglang-cpu-path", help="the folder to put first on PYTHONPATH to run SGLang on a CPU (a "
                       "stand-in for the CUDA-only sgl_kernel wheel; never on a GPU machine)")
    s.set_defaults(func=cmd_sglang_cpu_path)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
