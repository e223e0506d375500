"""The factory encoding: a stand-in for the real `tokenizer.pkl`, trained offline on text found on this machine.

Shaped exactly like nanochat's (32759 ranks + 9 specials, the same split pattern), with merges a BPE trainer
learns from the stdlib's sources and the system's licence texts, kept only where tiktoken's rank rule can reach
them. `cognica make-checkpoint` and the tests use it; nothing in it is needed to serve a published checkpoint.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import random
import sysconfig
from pathlib import Path

import tiktoken

from cognica.tokenizer import N_RANKS, SPLIT_PATTERN, TokenizerError, _bpe_parts, _from_unicode, make_encoding
from cognica.tokenizer_cache import cache_dir

logger = logging.getLogger(__name__)

_FACTORY_VERSION = "1"  # bump when the factory's corpus or algorithm changes: it keys the cache
_FACTORY_CORPUS_BYTES = 24 << 20  # ~8 s of BpeTrainer on 2 cores, and yields >35k merges




def _corpus_files(seed: int) -> list[Path]:
    """Deterministic: the stdlib's .py/.txt files and /usr/share/common-licenses, sorted, seeded shuffle."""
    roots = [Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/common-licenses")]
    files: list[Path] = []
    for root in roots:
        for d, dirs, names in os.walk(root):
            dirs[:] = sorted(x for x in dirs if x not in ("site-packages", "dist-packages", "__pycache__"))
            files += [Path(d) / n for n in sorted(names) if root.name == "common-licenses" or
                      n.endswith((".py", ".txt"))]
    files.sort()
    random.Random(seed).shuffle(files)
    return files


def _read_corpus(files: list[Path]) -> tuple[list[str], list[str]]:
    texts, used, total = [], [], 0
    for p in files:
        if total >= _FACTORY_CORPUS_BYTES:
            break
        try:
            data = p.read_bytes()
            texts.append(data.decode("utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        used.append(f"{p}:{len(data)}")
        total += len(data)
    return texts, used


def _train_ranks(texts: list[str], seed: int) -> dict[bytes, int]:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    # Ask for spare merges: a few may be unreachable under tiktoken's rank rule and are dropped below.
    trainer = trainers.BpeTrainer(vocab_size=N_RANKS + 2000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]

    ranks = {bytes([i]): i for i in range(256)}
    dropped = 0
    for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in merges):
        if len(ranks) == N_RANKS:
            break
        token = _from_unicode(a) + _from_unicode(b)
        if token in ranks:
            continue
        # tiktoken can only produce a token whose bytes BPE-merge into exactly two lower-ranked tokens
        if len(_bpe_parts(ranks, token, len(ranks))) == 2:
            ranks[token] = len(ranks)
        else:
            dropped += 1
    if dropped:
        logger.info("factory tokenizer: dropped %d trained merges unreachable under tiktoken's rule", dropped)
    if len(ranks) < N_RANKS:
        missing = N_RANKS - len(ranks)
        logger.warning("factory tokenizer: corpus gave %d merges; filling %d with seeded random pairs",
                       len(ranks) - 256, missing)
        rng, pool = random.Random(seed), list(ranks)
        while len(ranks) < N_RANKS:
            token = rng.choice(pool) + rng.choice(pool)
            if token not in ranks and len(_bpe_parts(ranks, token, len(ranks))) == 2:
                ranks[token] = len(ranks)
                pool.append(token)
    return ranks


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def train_factory_encoding(seed: int = 0) -> tiktoken.Encoding:
    """An Encoding shaped exactly like nanochat's tokenizer.pkl (32759 ranks + 9 specials), merges trained
    offline on local text. Cached on disk (tiktoken ranks format) keyed by the corpus, seed and version."""
    texts, used = _read_corpus(_corpus_files(seed))
    key = json.dumps([_FACTORY_VERSION, seed, _FACTORY_CORPUS_BYTES, used])
    path = cache_dir() / f"factory-{hashlib.sha256(key.encode()).hexdigest()[:16]}.tiktoken"
    if path.is_file():
        ranks = _read_ranks(path)
    else:
        logger.info("training the factory tokenizer on %d local files (%d MiB)", len(texts),
                    sum(map(len, texts)) >> 20)
        ranks = _train_ranks(texts, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
        os.replace(tmp, path)
    if len(ranks) != N_RANKS:
        raise TokenizerError(f"{path}: expected {N_RANKS} ranks, found {len(ranks)}; delete the cache file")
    return make_encoding(ranks)


def write_token_bytes(enc: tiktoken.Encoding, path: str | os.PathLike) -> None:
    """nanochat's token_bytes.pt: int32 [n_vocab], the byte length of each token, 0 for specials."""
    import torch

    specials = set(enc._special_tokens.values())
    lengths = [0 if i in specials else len(enc.decode_single_token_bytes(i)) for i in range(enc.n_vocab)]
    torch.save(torch.tensor(lengths, dtype=torch.int32), path)
