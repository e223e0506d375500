"""The converted-tokenizer cache: one verified directory per tokenizer.pkl content and converter version.

Notable:
- An entry is `<cache>/tokenizers/<sha256 of tokenizer.pkl>-v<converter version>/`: the converter's files plus
  `manifest.json`, written last, holding the converter version, the pickle's SHA-256 and each file's SHA-256. An
  entry is trusted only if it holds exactly the converter's files, each matching its manifest hash, and the manifest
  is this converter's for this pickle. Anything else (truncated, edited, a file missing or added, half-written,
  another version's) is converted again and replaced; nothing of it is read.
- Entries are built in a temporary directory beside the entry and renamed into place, under an exclusive lock
  (`.<entry>.lock`, flock) taken only to convert: concurrent engine processes convert once, none replaces an entry
  another has verified, and none sees a partial one. Checking a good entry takes no lock.
- A cache that cannot be written (a read-only home, COGNICA_CACHE_DIR on a read-only file system) does not stop a
  load: the files go to a private temporary directory of this process, removed at exit.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# This process's conversions while the cache cannot be written: entry path -> (pid, private directory). The pid
# keeps a forked child from using, or removing at its exit, its parent's directory.
_private: dict[str, tuple[int, Path]] = {}


def cache_dir() -> Path:
    """`$COGNICA_CACHE_DIR`, else `$XDG_CACHE_HOME/cognica`, else `~/.cache/cognica`."""
    base = os.environ.get("COGNICA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cognica")
    return Path(base)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry_bytes(files: dict[str, str], key: str, version: str) -> dict[str, bytes]:
    """The entry's files as written, `manifest.json` last."""
    data = {name: text.encode("utf-8") for name, text in files.items()}
    manifest = {"converter_version": version, "tokenizer_pkl_sha256": key,
                "files": {name: _sha256(blob) for name, blob in data.items()}}
    return {**data, MANIFEST: (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()}


def entry_problem(entry: Path, key: str, version: str, names: tuple[str, ...]) -> str | None:
    """Why `entry` is not exactly the converter's output `names` for the pickle with SHA-256 `key`; None if it is."""
    try:
        manifest = json.loads((entry / MANIFEST).read_bytes())
        present = sorted(p.name for p in entry.iterdir())
    except FileNotFoundError:
        return f"no {MANIFEST}, which is written last: the entry is incomplete"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__}: {e})"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"{MANIFEST} lists no files"
    if manifest.get("converter_version") != version or manifest.get("tokenizer_pkl_sha256") != key:
        return f"{MANIFEST} is for another converter version or tokenizer.pkl"
    expected = sorted([*names, MANIFEST])
    if sorted(manifest["files"]) != sorted(names) or present != expected:
        return f"holds {present}, not {expected}"
    for name in names:
        try:
            data = (entry / name).read_bytes()
        except OSError as e:
            return f"{name} unreadable ({e.strerror})"
        if _sha256(data) != manifest["files"][name]:
            return f"{name} is not what the converter wrote (SHA-256 differs)"
    return None


def _install(entry: Path, data: dict[str, bytes]) -> None:
    """Write `data` to a temporary directory beside `entry`, then rename it to `entry`, moving any old one aside."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        for name, blob in data.items():
            (tmp / name).write_bytes(blob)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        if os.path.lexists(entry):
            # renamed away in one step, so no reader sees a half-deleted entry (it would fail the check anyway)
            trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.damaged.", dir=entry.parent))
            os.rename(entry, trash / "entry")
            shutil.rmtree(trash, ignore_errors=True)
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_private(directory: Path, pid: int) -> None:
    if os.getpid() == pid:
        shutil.rmtree(directory, ignore_errors=True)


def _private_entry(entry: Path, data: dict[str, bytes], source: Path, error: OSError, damage: str | None) -> Path:
    """`data` written to a private temporary directory of this process, removed at exit."""
    pid, directory = os.getpid(), None
    try:
        directory = Path(tempfile.mkdtemp(prefix=f"cognica-tokenizer-{entry.name[:16]}-"))
        atexit.register(_remove_private, directory, pid)
        for name, blob in data.items():
            (directory / name).write_bytes(blob)
    except OSError as e:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        raise OSError(f"{source}: cannot write its converted tokenizer to the cache {cache_dir()} ({error}) nor to a "
                      f"temporary directory ({e}); set COGNICA_CACHE_DIR to a writable directory") from None
    _private[str(entry)] = (pid, directory)
    damaged = f"; its entry {entry} failed its check ({damage}) and was not used" if damage else ""
    logger.warning("cognica: cannot write the tokenizer cache %s (%s)%s; converted %s (restricted unpickler) into %s "
                   "for this process only, removed at exit; set COGNICA_CACHE_DIR to a writable directory to convert "
                   "once and reuse it", cache_dir(), error, damaged, source, directory)
    return directory


def converted_entry(source: Path, key: str, version: str, names: tuple[str, ...],
                    convert: Callable[[], dict[str, str]]) -> Path:
    """The directory holding `convert()`'s files `names` for `source` (the pickle, SHA-256 `key`): a verified cache
    entry, else converted and installed (one warning line), else, if the cache cannot be written, converted into a
    private directory (one warning line per process). Errors of `convert` propagate before any entry is written
    (only the entry's lock file may have been created)."""
    entry = cache_dir() / "tokenizers" / f"{key}-v{version}"
    if entry_problem(entry, key, version, names) is None:
        logger.debug("using the tokenizer converted earlier from %s: %s", source, entry)
        return entry
    private = _private.get(str(entry))
    if private and private[0] == os.getpid() and entry_problem(private[1], key, version, names) is None:
        return private[1]
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = open(entry.parent / f".{entry.name}.lock", "ab")
    except OSError as e:
        damage = entry_problem(entry, key, version, names) if os.path.lexists(entry) else None
        return _private_entry(entry, _entry_bytes(convert(), key, version), source, e, damage)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        except OSError:  # a file system without locks: renames stay atomic, concurrent starts may both convert
            logger.debug("no lock on %s; converting unlocked", lock.name)
        damage = entry_problem(entry, key, version, names) if os.path.lexists(entry) else None
        if os.path.lexists(entry) and damage is None:
            return entry  # another process converted it while this one waited
        data = _entry_bytes(convert(), key, version)
        try:
            _install(entry, data)
        except OSError as e:
            if entry_problem(entry, key, version, names) is None:
                return entry
            return _private_entry(entry, data, source, e, damage)
    if damage:
        logger.warning("cognica: the converted tokenizer in %s failed its check (%s), so none of it was used; "
                       "converted %s again (restricted unpickler) and replaced it", entry, damage, source)
    else:
        # once per tokenizer.pkl content (WARNING: the engines show no INFO of ours)
        logger.warning("cognica: converted %s to a Hugging Face tokenizer (restricted unpickler) in %s; later loads "
                       "reuse it", source, entry)
    return entry
