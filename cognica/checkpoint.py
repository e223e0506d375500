"""Checkpoint layout: header validation before any allocation, names checked against `cognica.names`, lazy reads.

Published layout: `model.safetensors` (or `*.safetensors` shards with `model.safetensors.index.json`)
holding nanochat's native tensor names, possibly under a wrapper prefix (`model.`, `_orig_mod.`).
`canonical_name()` strips the prefix; `expected_tensors()` is the whole table; `open_checkpoint()`
parses every safetensors header itself (so a truncated file or a header that lies about offsets is
reported as such) and checks names, count, shapes and dtypes against the config. Only then are
tensors read, lazily, through `safetensors.safe_open`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cognica.config import CognicaConfig
from cognica.names import (
    IGNORABLE,
    SCALAR_NAMES,
    CheckpointError,
    canonical_name,
    expected_tensors,
    mismatch_problems,
)
from cognica.quantization import quantization_layout

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2), "F32": (torch.float32, 4), "F64": (torch.float64, 8),
    "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "I16": (torch.int16, 2), "I32": (torch.int32, 4),
    "I64": (torch.int64, 8), "BOOL": (torch.bool, 1), "F8_E4M3": (torch.float8_e4m3fn, 1),
}
FLOAT_DTYPES = ("BF16", "F16", "F32")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorEntry:
    name: str  # as stored in the file
    file: Path
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse one safetensors header and check it against the file: size, offsets, dtypes, overlaps."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path.name}: cannot read ({e.strerror})") from None
    if size == 0:
        raise CheckpointError(f"{path.name}: empty file (0 bytes); the download is incomplete or the file is corrupt")
    if size < 8:
        raise CheckpointError(f"{path.name}: truncated ({size} bytes, shorter than the 8-byte header length)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path.name}: truncated or corrupt: header claims {n} bytes but the file has {size - 8} after it"
            )
        blob = f.read(n)
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurd nesting
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)")
    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, TensorEntry] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            b, e = int(b), int(e)
        except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
            raise CheckpointError(f"{path.name}: corrupt header entry for tensor {name!r}: {info!r}") from None
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape) or b < 0 or e < b:
            raise CheckpointError(f"{path.name}: tensor {name!r} has invalid shape {shape} or offsets [{b}, {e})")
        nbytes = SAFETENSORS_DTYPES[dtype][1]
        for s in shape:
            nbytes *= s
        if e - b != nbytes:
            raise CheckpointError(
                f"{path.name}: header lies about tensor {name!r}: offsets [{b}, {e}) span {e - b} bytes"
                f" but {dtype}{list(shape)} needs {nbytes}"
            )
        if e > data_len:
            raise CheckpointError(
                f"{path.name}: truncated: tensor {name!r} ends at byte {e} of the data section"
                f" but the file holds only {data_len} data bytes"
            )
        spans.append((b, e, name))
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + b, data_start + e)
    spans.sort()
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path.name}: header lies about offsets: tensors {n0!r} and {n1!r} overlap")
    return entries


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def check_directory(model_dir: str | os.PathLike[str]) -> Path:
    """The directory exists and no file in it is a symlink that leaves it. A Hugging Face cache snapshot
    (`models--owner--name/snapshots/<rev>/`) links every file to the repo's `blobs/`: those links stay inside."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for p in sorted(root.iterdir()):
        if p.is_symlink() and not _inside(p, root) and not (blobs is not None and _inside(p, blobs)):
            raise CheckpointError(
                f"{p.name}: symlink points outside the checkpoint directory ({os.readlink(p)}); refusing it"
            )
    return root


def weight_files(root: Path) -> list[Path]:
    """The safetensors files of the checkpoint: the single file, or the shards named by the index."""
    single = root / SINGLE_FILE
    index = root / INDEX_FILE
    shards = sorted(p for p in root.glob("*.safetensors") if p.name != SINGLE_FILE)
    if single.exists() and (index.exists() or shards):
        raise CheckpointError(
            f"{root}: both {SINGLE_FILE} and sharded weights ({INDEX_FILE if index.exists() else shards[0].name})"
            " are present; keep one layout"
        )
    if single.exists():
        return [single]
    if index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError) as e:
            raise CheckpointError(f"{INDEX_FILE}: corrupt index ({e!r})") from None
        files = []
        for n in names:
            p = root / n
            if not isinstance(n, str) or "/" in n or not p.exists():
                raise CheckpointError(f"{INDEX_FILE}: names shard {n!r}, which is missing from {root}")
            files.append(p)
        return files
    if shards:
        raise CheckpointError(f"{root}: sharded *.safetensors files without {INDEX_FILE}")
    raise CheckpointError(f"{root}: no {SINGLE_FILE} (nor an {INDEX_FILE} with shards)")


class Checkpoint:
    """A validated checkpoint directory: config plus a table canonical name -> stored tensor."""

    def __init__(self, root: Path, config: CognicaConfig, entries: dict[str, TensorEntry]):
        self.root, self.config, self.entries = root, config, entries

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    @property
    def num_params(self) -> int:
        total = 0
        for e in self.entries.values():
            n = 1
            for s in e.shape:
                n *= s
            total += n
        return total

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor (canonical name) from disk."""
        from safetensors import safe_open

        e = self.entries[name]
        with safe_open(str(e.file), framework="pt") as f:
            return f.get_tensor(e.name)

    def iter_tensors(self, progress: bool = False,
                     keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical name, tensor) file by file, only the names `keep` accepts (default all: e.g.
        `CognicaConfig.is_built` for a stage prefix, whose other tensors are never read); every float tensor is
        checked for NaN/Inf."""
        from safetensors import safe_open
        from tqdm.auto import tqdm

        by_file: dict[Path, list[str]] = {}
        for canon, e in self.entries.items():
            if keep is None or keep(canon):
                by_file.setdefault(e.file, []).append(canon)
        total = sum(len(names) for names in by_file.values())
        bar = tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress)
        for path, names in sorted(by_file.items()):
            with safe_open(str(path), framework="pt") as f:
                for canon in names:
                    t = f.get_tensor(self.entries[canon].name)
                    check_finite(canon, t)
                    bar.update(1)
                    yield canon, t
        bar.close()

    def state_dict(self, dtype: torch.dtype | None = None, progress: bool = False,
                   keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        return {n: (t.to(dtype) if dtype is not None else t) for n, t in self.iter_tensors(progress, keep)}


def check_finite(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"tensor {name!r}: {bad} NaN/Inf value(s); the checkpoint is corrupt")


def validate_entries(cfg: CognicaConfig, stored: dict[str, TensorEntry]) -> dict[str, TensorEntry]:
    """Map stored names to canonical ones and compare with the table (plus the tensors config.json's
    quantization_config adds); raise listing every problem."""
    quant = quantization_layout(cfg)
    expected = {**expected_tensors(cfg), **{n: shapes[0] for n, (shapes, _) in quant.extras.items()}}
    entries: dict[str, TensorEntry] = {}
    problems: list[str] = []
    unknown: list[str] = []
    for name, e in stored.items():
        canon = canonical_name(name)
        if canon in IGNORABLE:
            continue
        if canon not in expected:
            unknown.append(name)
            continue
        if canon in entries:
            problems.append(f"tensor {canon!r} stored twice (as {entries[canon].name!r} and {name!r})")
            continue
        entries[canon] = e
    problems += mismatch_problems([n for n in expected if n not in entries], unknown)
    for canon, e in entries.items():
        if canon in quant.extras:
            shapes, kind = quant.extras[canon]
            if e.shape not in shapes:
                problems.append(f"tensor {e.name!r}: expected shape {list(shapes[0])}, found {list(e.shape)}")
            if (e.dtype not in FLOAT_DTYPES) if kind == "float" else (e.dtype != kind):
                problems.append(f"tensor {e.name!r}: expected {kind} for a quantization {canon.rsplit('.', 1)[1]}, "
                                f"found {e.dtype}")
            continue
        if e.shape != expected[canon]:
            hint = ""
            if canon in ("transformer.wte.weight", "lm_head.weight") or canon.startswith("value_embeds."):
                hint = f" (config vocab_size={cfg.vocab_size}: vocab mismatch between config and tensors?)"
            problems.append(f"tensor {e.name!r}: expected shape {list(expected[canon])}, found {list(e.shape)}{hint}")
        if canon in quant.weight_dtypes:
            if e.dtype != quant.weight_dtypes[canon]:
                problems.append(f"tensor {e.name!r}: quantization_config makes it a {quant.weight_dtypes[canon]} "
                                f"weight, found {e.dtype}")
        elif e.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {e.name!r}: expected a float dtype (bf16/fp16/fp32), found {e.dtype}")
    if problems:
        raise CheckpointError("checkpoint does not match config.json: " + "; ".join(problems))
    return entries


def read_entries(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor's header entry across the weight files; a name stored twice is an error."""
    stored: dict[str, TensorEntry] = {}
    for path in files:
        for name, e in read_safetensors_header(path).items():
            if name in stored:
                raise CheckpointError(f"tensor {name!r} appears in both {stored[name].file.name} and {path.name}")
            stored[name] = e
    return stored


def open_checkpoint(model_dir: str | os.PathLike[str], check_scalars: bool = True) -> Checkpoint:
    """Validate a checkpoint directory (config, files, headers, names, shapes, dtypes) without
    reading the big tensors; raise CheckpointError / ConfigError with one specific message."""
    root = check_directory(model_dir)
    cfg = CognicaConfig.from_file(root / "config.json")
    ckpt = Checkpoint(root, cfg, validate_entries(cfg, read_entries(weight_files(root))))
    if check_scalars:
        for name in SCALAR_NAMES:
            check_finite(name, ckpt.tensor(name))
    return ckpt


__all__ = ["Checkpoint", "open_checkpoint", "read_entries", "read_safetensors_header", "validate_entries",
           "weight_files"]
