"""The transformers side of the tokenizer: `CognicaTokenizerFast` and its registration with `AutoTokenizer`.

A directory (or Hub snapshot) as published has `tokenizer.pkl` and no `tokenizer.json`; the registered classes
(ours, and `CognicaPoETokenizerFast`, the name the published tokenizer_config.json's `tokenizer_class` resolves to,
so its remote-code `auto_map` is never followed) load its converted copy (`cognica.tokenizer.converted_tokenizer`).
The class never doubles an explicit leading `<|bos|>`. See `cognica.tokenizer` for the conversion itself.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from cognica.tokenizer import (
    BOS,
    HF_TOKENIZER_CLASS,
    PUBLISHED_TOKENIZER_CLASS,
    _model_max_length,
    converted_tokenizer,
)


def _published_tokenizer(name: str | os.PathLike, kwargs: dict[str, Any]) -> tuple[Path, int] | None:
    """For a directory or Hub id that has tokenizer.pkl and no tokenizer.json: (converted dir, context length)."""
    from cognica.hub import is_repo_id, resolve

    if os.path.isdir(name):
        root = Path(name) / kwargs.get("subfolder", "")
    elif is_repo_id(name):
        root = resolve(name, revision=kwargs.get("revision"), cache_dir=kwargs.get("cache_dir"),
                       token=kwargs.get("token"), local_files_only=bool(kwargs.get("local_files_only")),
                       allow_patterns=["tokenizer*", "special_tokens_map.json", "config.json"])
    else:
        return None
    if (root / "tokenizer.json").is_file() or not (root / "tokenizer.pkl").is_file():
        return None
    return converted_tokenizer(root / "tokenizer.pkl"), _model_max_length(root)


# ---------------------------------------------------------------------------------------------------------
# BOS: a PreTrainedTokenizerFast that never doubles an explicit leading <|bos|>


@functools.lru_cache(maxsize=1)
def _tokenizer_class() -> type:
    from transformers import PreTrainedTokenizerFast

    def strip_bos(self: Any, text: Any, add_special_tokens: bool, kwargs: dict[str, Any]) -> Any:
        split = kwargs.get("split_special_tokens")
        split = getattr(self, "split_special_tokens", False) if split is None else split
        if not add_special_tokens or split or kwargs.get("is_split_into_words"):
            return text
        bos_id = self.convert_tokens_to_ids(BOS)
        if self._tokenizer.encode("", add_special_tokens=True).ids[:1] != [bos_id]:
            return text  # the post-processor does not add BOS (changed at runtime): keep the text's own
        if isinstance(text, str):
            return text[len(BOS) :] if text.startswith(BOS) else text
        if isinstance(text, tuple) and text and isinstance(text[0], str):
            return (strip_bos(self, text[0], True, kwargs), *text[1:])
        if isinstance(text, list):
            return [strip_bos(self, t, True, kwargs) for t in text]
        return text

    class CognicaTokenizerFast(PreTrainedTokenizerFast):
        """PreTrainedTokenizerFast whose BOS post-processor skips texts that already start with <|bos|>."""

    # transformers 4.x funnels every encode through _batch_encode_plus; 5.x through _encode_plus.
    if hasattr(PreTrainedTokenizerFast, "_batch_encode_plus"):
        def _batch_encode_plus(self, batch_text_or_text_pairs, add_special_tokens=True, *args, **kwargs):
            batch = strip_bos(self, list(batch_text_or_text_pairs), add_special_tokens, kwargs)
            return super(CognicaTokenizerFast, self)._batch_encode_plus(batch, add_special_tokens, *args, **kwargs)

        CognicaTokenizerFast._batch_encode_plus = _batch_encode_plus
    else:
        def _encode_plus(self, text, text_pair=None, add_special_tokens=True, *args, **kwargs):
            text = strip_bos(self, text, add_special_tokens, kwargs)
            return super(CognicaTokenizerFast, self)._encode_plus(text, text_pair, add_special_tokens, *args,
                                                                  **kwargs)

        CognicaTokenizerFast._encode_plus = _encode_plus
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As PreTrainedTokenizerFast's, plus: a directory or Hub id with only tokenizer.pkl loads its converted
        copy (`converted_tokenizer`)."""
        published = _published_tokenizer(pretrained_model_name_or_path, kwargs)
        if published is None:
            return super(CognicaTokenizerFast, cls).from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        converted, model_max_length = published
        kwargs = {k: v for k, v in kwargs.items() if k not in ("subfolder", "revision", "_commit_hash")}
        kwargs.setdefault("model_max_length", model_max_length)
        tok = super(CognicaTokenizerFast, cls).from_pretrained(converted, *args, **kwargs)
        tok.name_or_path = str(pretrained_model_name_or_path)
        return tok

    CognicaTokenizerFast.from_pretrained = classmethod(from_pretrained)
    CognicaTokenizerFast.__module__ = __name__
    CognicaTokenizerFast.__qualname__ = HF_TOKENIZER_CLASS
    return CognicaTokenizerFast


@functools.lru_cache(maxsize=1)
def _published_class_alias() -> type:
    """`CognicaPoETokenizerFast`: our class under the name the published tokenizer_config.json asks for."""
    alias = type(PUBLISHED_TOKENIZER_CLASS + "Fast", (_tokenizer_class(),), {"__module__": __name__})
    return alias


def __getattr__(name: str) -> Any:
    if name == HF_TOKENIZER_CLASS:  # built on first use (subclasses a transformers class)
        return _tokenizer_class()
    if name == PUBLISHED_TOKENIZER_CLASS + "Fast":
        return _published_class_alias()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CognicaTokenizerKey:
    """Key for AutoTokenizer's mapping when no config class is given; lookups go by class name."""


class _PublishedTokenizerKey:
    """Key for the published-name alias in AutoTokenizer's mapping; lookups go by class name."""


def register_tokenizer(config_class: type | None = None) -> None:
    """Make `AutoTokenizer` resolve tokenizer_class "CognicaTokenizerFast" and the published "CognicaPoETokenizer"
    to our class (idempotent, no remote code)."""
    from transformers import AutoTokenizer

    AutoTokenizer.register(config_class or _CognicaTokenizerKey, fast_tokenizer_class=_tokenizer_class(),
                           exist_ok=True)
    AutoTokenizer.register(_PublishedTokenizerKey, fast_tokenizer_class=_published_class_alias(), exist_ok=True)
