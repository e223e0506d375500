"""The nanochat tokenizer: a pickled tiktoken `Encoding`, loaded safely and converted to a HF fast tokenizer.

Notable:
- `tokenizer.pkl` is `pickle.dump(tiktoken.Encoding)`. Its only global is `tiktoken.core.Encoding` (the
  state is a plain dict), so `load_tiktoken_pickle` admits that one name, maps it to an inert stand-in,
  validates the recorded state and builds the `Encoding` itself. Any other global is refused before it runs.
- tiktoken encodes a pre-token whole when it is in the vocab and otherwise merges the adjacent pair whose
  concatenation has the lowest rank. The HF equivalent is a byte-level BPE with `ignore_merges=True` and one
  merge per way of splitting each token into two tokens of lower rank, ordered by the token's rank.
- Every document starts with `<|bos|>`. The tokenizer.json post-processor prepends it (any stock consumer
  gets it); `CognicaTokenizerFast` additionally drops a leading literal "<|bos|>" from the text before the
  post-processor adds one, so an explicit BOS is never doubled. eos is `<|bos|>` too: nanochat trains base
  models on documents delimited by BOS only, so a finished document is followed by `<|bos|>`.
- A directory (or Hub snapshot) as published has `tokenizer.pkl` and no `tokenizer.json`. The registered
  tokenizer classes (`cognica.hf_tokenizer`) convert it once through the restricted unpickler into a cache
  outside the model directory, keyed by the pickle's SHA-256 (`converted_tokenizer`; entries are verified against
  a manifest, see `cognica.tokenizer_cache`), and load the
  result. The snapshot is never written.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, BinaryIO

import tiktoken

from cognica.tokenizer_cache import converted_entry

logger = logging.getLogger(__name__)

# nanochat a825e63 nanochat/tokenizer.py: GPT-4's split with \p{N}{1,2} instead of \p{N}{1,3}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
BOS = "<|bos|>"
N_RANKS = 32759  # 256 raw bytes + 32503 merges; specials follow at 32759..32767
VOCAB_SIZE = N_RANKS + len(SPECIAL_TOKENS)
ENCODING_NAME = "rustbpe"  # what nanochat's RustBPETokenizer names its Encoding
HF_TOKENIZER_CLASS = "CognicaTokenizerFast"
# The published tokenizer_config.json names this class (with an auto_map to its remote code). transformers 5.19's
# AutoTokenizer.from_pretrained (transformers/models/auto/tokenization_auto.py) does not follow the auto_map when
# the config class has a registered tokenizer and trust_remote_code is not True; it then looks the name up with
# tokenizer_class_from_name (same file), trying "CognicaPoETokenizer" and "CognicaPoETokenizerFast" among the
# registered classes, so we register our class under the second name. Both engines get here through AutoTokenizer
# with trust_remote_code=False: vLLM via `CachedHfTokenizer.from_pretrained` in vllm/tokenizers/hf.py (on the
# snapshot path: offline ids are replaced by `EngineArgs.__post_init__` in vllm/engine/arg_utils.py, online ones by
# `get_non_weight_snapshot_path` in vllm/transformers_utils/repo_utils.py), SGLang via
# `_auto_tokenizer_from_pretrained` in sglang/srt/utils/hf_transformers/tokenizer.py (with the Hub id itself, which
# `_published_tokenizer` resolves).
PUBLISHED_TOKENIZER_CLASS = "CognicaPoETokenizer"
# bump when hf_tokenizer_json or the written configs change: it keys the converted cache (2: entries have a manifest)
_CONVERTER_VERSION = "2"
CONVERTED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class TokenizerError(ValueError):
    """A tokenizer file that is missing, malformed or refused."""


# ---------------------------------------------------------------------------------------------------------
# Restricted unpickling


class _EncodingState:
    """Inert stand-in for `tiktoken.core.Encoding` while unpickling: it records the state and runs nothing."""

    def __setstate__(self, state: object) -> None:
        self.state = state


_ALLOWED_GLOBALS = {("tiktoken.core", "Encoding"), ("tiktoken", "Encoding")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _EncodingState
        raise TokenizerError(
            f"refusing to unpickle global '{module}.{name}': a tokenizer pickle may only reference "
            "tiktoken.core.Encoding"
        )


def _encoding_from_state(state: object, where: str) -> tiktoken.Encoding:
    if isinstance(state, str):
        raise TokenizerError(f"{where}: pickle names the registered tiktoken encoding {state!r}, not a vocab")
    keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(map(repr, state)) if isinstance(state, dict) else type(state).__name__
        raise TokenizerError(f"{where}: Encoding state must be a dict with keys {sorted(keys)}, got {got}")
    name, pat_str, ranks, specials = (state[k] for k in ("name", "pat_str", "mergeable_ranks", "special_tokens"))
    if not isinstance(name, str) or not isinstance(pat_str, str):
        raise TokenizerError(f"{where}: Encoding name and pat_str must be str")
    if not isinstance(ranks, dict) or not all(
        type(k) is bytes and type(v) is int for k, v in ranks.items()
    ):
        raise TokenizerError(f"{where}: mergeable_ranks must be dict[bytes, int]")
    if not isinstance(specials, dict) or not all(
        type(k) is str and type(v) is int for k, v in specials.items()
    ):
        raise TokenizerError(f"{where}: special_tokens must be dict[str, int]")
    if len(set(ranks.values())) != len(ranks) or set(ranks.values()) & set(specials.values()):
        raise TokenizerError(f"{where}: two tokens share a rank (tiktoken's core would panic on it)")
    try:
        return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    except Exception as e:  # tiktoken raises ValueError/AssertionError on bad regexes or ranks
        raise TokenizerError(f"{where}: tiktoken rejected the recorded Encoding: {e}") from e


def load_tiktoken_pickle(path: str | os.PathLike) -> tiktoken.Encoding:
    """Load a pickled `tiktoken.Encoding` (nanochat's tokenizer.pkl) without running code from the file."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer pickle not found: {path}")
    with open(path, "rb") as f:
        return _unpickle_encoding(f, str(path))


def _unpickle_encoding(f: BinaryIO, where: str) -> tiktoken.Encoding:
    try:
        obj = _RestrictedUnpickler(f).load()
    except TokenizerError:
        raise
    except Exception as e:  # truncated or corrupt streams raise EOFError, UnpicklingError, TypeError, ...
        raise TokenizerError(f"{where}: not a readable pickle ({type(e).__name__}: {e})") from e
    if f.read(1):
        raise TokenizerError(f"{where}: trailing bytes after the pickle")
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise TokenizerError(f"{where}: expected a pickled tiktoken.Encoding, got {type(obj).__name__}")
    return _encoding_from_state(obj.state, where)


def make_encoding(mergeable_ranks: dict[bytes, int], name: str = ENCODING_NAME) -> tiktoken.Encoding:
    """An Encoding shaped like nanochat's: the given ranks, nanochat's split and its 9 specials after them."""
    specials = {s: len(mergeable_ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks,
                             special_tokens=specials)


# ---------------------------------------------------------------------------------------------------------
# BPE helpers shared by the factory and the converter


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on `token` using only ranks below `max_rank`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, used by HF ByteLevel."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = (b for b in range(256) if b not in keep)
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + n) for n, b in enumerate(extra)})
    return table


def _to_unicode(token: bytes) -> str:
    table = _byte_to_unicode()
    return "".join(table[b] for b in token)


def _from_unicode(text: str) -> bytes:
    inverse = {c: b for b, c in _byte_to_unicode().items()}
    return bytes(inverse[c] for c in text)


# ---------------------------------------------------------------------------------------------------------
# Conversion to a Hugging Face fast tokenizer


def _vocab_and_merges(enc: tiktoken.Encoding) -> tuple[dict[str, int], list[tuple[str, str]]]:
    ranks = enc._mergeable_ranks
    vocab = {_to_unicode(t): r for t, r in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):  # every split tiktoken could merge, so HF sees the same pairs
            left, right = ranks.get(token[:i]), ranks.get(token[i:])
            if left is not None and right is not None and left < rank and right < rank:
                merges.append((rank, left, right, _to_unicode(token[:i]), _to_unicode(token[i:])))
    merges.sort()
    return vocab, [(a, b) for *_, a, b in merges]


def hf_tokenizer_json(enc: tiktoken.Encoding) -> str:
    """The `tokenizer.json` of a HF fast tokenizer that gives tiktoken's ids, with a BOS post-processor."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = _vocab_and_merges(enc)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if tok.token_to_id(s) != i:
            raise TokenizerError(f"special token {s} landed at id {tok.token_to_id(s)}, expected {i}")
    bos = enc._special_tokens[BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A:0", pair=f"{BOS} $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)])
    return tok.to_str(pretty=True)


def _model_max_length(model_dir: Path) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    for k in ("sequence_len", "max_position_embeddings", "n_positions"):
        if isinstance(cfg.get(k), int):
            return cfg[k]
    return 2048


def _write_keeping_original(path: Path, text: str) -> None:
    """Write `text` to `path`; a different existing file is first kept as `<stem>.orig<suffix>` (once)."""
    if path.is_file() and path.read_text(errors="replace") != text:
        orig = path.with_name(f"{path.stem}.orig{path.suffix}")
        if not orig.exists():
            shutil.copy2(path, orig)
            logger.info("kept the published %s as %s", path.name, orig.name)
    path.write_text(text)


def _hf_tokenizer_files(enc: tiktoken.Encoding, where: str, model_max_length: int) -> dict[str, str]:
    """CONVERTED_FILES (tokenizer.json, tokenizer_config.json, special_tokens_map.json) for `enc`, read from `where`."""
    if BOS not in enc._special_tokens:
        raise TokenizerError(f"{where}: no {BOS} special token")
    special_map = {"bos_token": BOS, "eos_token": BOS}
    # No add_bos_token: BOS lives in tokenizer.json's post-processor, and transformers 5 rebuilds the
    # post-processor when the key is present. No auto_map: nothing runs remote code.
    config = {
        "tokenizer_class": HF_TOKENIZER_CLASS,
        **special_map,
        "clean_up_tokenization_spaces": False,  # decode must return exactly what tiktoken returns
        "model_max_length": model_max_length,
        "additional_special_tokens": [s for s in enc._special_tokens if s != BOS],
    }
    return {"tokenizer.json": hf_tokenizer_json(enc),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2) + "\n"}


def convert_tokenizer(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Convert `model_dir/tokenizer.pkl` (restricted unpickling) to tokenizer.json, tokenizer_config.json and
    special_tokens_map.json in `out_dir` (default `model_dir`). Idempotent; returns the output directory."""
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir
    out.mkdir(parents=True, exist_ok=True)
    pkl = model_dir / "tokenizer.pkl"
    for name, text in _hf_tokenizer_files(load_tiktoken_pickle(pkl), str(pkl), _model_max_length(model_dir)).items():
        _write_keeping_original(out / name, text)
    return out


def converted_tokenizer(pkl: str | os.PathLike) -> Path:
    """The HF tokenizer files converted from `pkl`, in `<cognica cache>/tokenizers/<sha256 of pkl>-v<version>/`:
    converted on the first call (restricted unpickler; a refused or malformed pickle raises one TokenizerError line
    naming the file), reused while the entry passes its manifest check, converted again otherwise; in a private
    temporary directory if the cache cannot be written (`cognica.tokenizer_cache`). The model directory is only
    read."""
    pkl = Path(pkl)
    try:
        data = pkl.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{pkl}: cannot read ({e.strerror})") from None
    key = hashlib.sha256(data).hexdigest()
    return converted_entry(pkl, key, _CONVERTER_VERSION, CONVERTED_FILES, lambda: _convert_pickle(pkl, data))


def _convert_pickle(pkl: Path, data: bytes) -> dict[str, str]:
    """CONVERTED_FILES for the pickle bytes `data` (the very bytes whose hash keys the entry) read from `pkl`."""
    try:
        # model_max_length is set per model at load time
        return _hf_tokenizer_files(_unpickle_encoding(io.BytesIO(data), str(pkl)), str(pkl), 2048)
    except TokenizerError as e:
        raise (e if str(pkl) in str(e) else TokenizerError(f"{pkl}: {e}")) from None
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # tiktoken's Rust core panics (pyo3 PanicException is a BaseException)
        first = str(e).splitlines()[0] if str(e) else ""
        raise TokenizerError(f"{pkl}: rejected while building the tokenizer ({type(e).__name__}: {first})") from None
