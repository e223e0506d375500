"""The tokenizer: restricted unpickling, the factory Encoding, token_bytes.pt, the HF conversion and its cache.

tiktoken is the oracle: the converted tokenizer must give its ids and its decoded text, plus one <|bos|>.
"""

import json
import logging
import os
import pickle
import random
import subprocess
import sysconfig
import threading
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from cognica.factory_tokenizer import train_factory_encoding, write_token_bytes
from cognica.hf_tokenizer import register_tokenizer
from cognica.tokenizer import (
    BOS,
    N_RANKS,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    VOCAB_SIZE,
    TokenizerError,
    _bpe_parts,
    convert_tokenizer,
    converted_tokenizer,
    load_tiktoken_pickle,
)
from tests.hub_fixture import CACHE_DAMAGES, damage_cache_entry, make_hostile, run_python, unwritable_cache_dir

BOS_ID = 32759
PUBLISHED_CONFIG = {"tokenizer_class": "NanoChatTokenizer", "auto_map": {"AutoTokenizer": ["missing.X", None]}}

CORPUS = [
    "hello world",
    "",
    " leading space and trailing spaces   ",
    "I'm here, they'll go, we've been, you're right, DON'T, I'M, She'S, it'd",
    "1234567 12 1 9876543210 3.14159 1e-10 0x1F",
    "   spaces   and\ttabs\t\tand\n\n\nnewlines  \n",
    "line1\r\nline2\r\n\r\nline4\rline5",
    "def f(x):\n    return x ** 2  # comment\n\nclass A(B):\n\tpass\n",
    "日本語のテキストと中文，还有标点。",
    "한국어 텍스트",
    "emoji 😀 👨‍👩‍👧‍👦 🏳️‍🌈 👍🏽 ❤️",
    "Ünïcödé façade naïve résumé ΑΒΓ Привет, мир! مرحبا بالعالم",
    "math: ∑ x² ≤ ∞ → ≠ ½",
    "\x00\x01 control \x7f zero\u200bwidth",
    "<|bos|>hello",
    "<|bos|>",
    "mid <|bos|> bos and <|bos|><|bos|> twice",
    "a<|user_start|>question<|user_end|><|assistant_start|>answer<|assistant_end|>",
    "<|python_start|>print(1)<|python_end|><|output_start|>1<|output_end|>",
]
PLAIN = [t for t in CORPUS if not any(s in t for s in SPECIAL_TOKENS)]


def tiktoken_ids(enc, text):
    return enc.encode(text, allowed_special="all")


@pytest.fixture(scope="module")
def enc():
    return train_factory_encoding(0)


def pickle_dir(d: Path, enc, tokenizer_config: dict) -> Path:
    """`d` with tokenizer.pkl (pickle.dump of `enc`, as nanochat writes it) and `tokenizer_config`."""
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    (d / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return d


@pytest.fixture(scope="module")
def model_dir(enc, tmp_path_factory):
    d = pickle_dir(tmp_path_factory.mktemp("model"), enc, PUBLISHED_CONFIG)
    (d / "config.json").write_text(json.dumps({"sequence_len": 1024}))
    convert_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf(model_dir):
    register_tokenizer()
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def raw(model_dir):
    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


# --- factory encoding -----------------------------------------------------------------------------------


def test_factory_encoding_shape(enc):
    ranks = enc._mergeable_ranks
    assert enc.n_vocab == VOCAB_SIZE == 32768, "vocab must be 32759 ranks + 9 specials"
    assert len(ranks) == N_RANKS and sorted(ranks.values()) == list(range(N_RANKS)), "ranks must be 0..32758"
    assert all(ranks[bytes([i])] == i for i in range(256)), "ranks 0..255 must be the raw bytes in order"
    assert enc._special_tokens == {s: BOS_ID + i for i, s in enumerate(SPECIAL_TOKENS)}, "specials moved"
    assert enc._pat_str == SPLIT_PATTERN and enc.name == "rustbpe", "split pattern or name differs from nanochat"


def test_factory_merges_are_reachable(enc):
    ranks = enc._mergeable_ranks
    bad = [t for t, r in ranks.items() if r >= 256 and len(_bpe_parts(ranks, t, r)) != 2]
    assert not bad, f"{len(bad)} tokens are not a merge of two lower-ranked tokens, e.g. {bad[:3]}"


def test_factory_encoding_is_cached_and_deterministic(enc):
    train_factory_encoding.cache_clear()
    again = train_factory_encoding(0)
    assert again is not enc and again._mergeable_ranks == enc._mergeable_ranks, "cache gave different ranks"


def test_factory_merges_compress_code(enc):
    text = Path(sysconfig.get_paths()["stdlib"], "json", "decoder.py").read_text()
    ratio = len(enc.encode_ordinary(text)) / len(text.encode())
    assert ratio < 0.35, f"{ratio:.2f} tokens per byte: the merges were not learned from text"


# --- restricted unpickling ------------------------------------------------------------------------------


class _Command:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _attacks(marker):
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "posix.system": _Command(os.system, f"touch {marker}"),
        "subprocess.call": _Command(subprocess.call, ["touch", str(marker)]),
        "builtins.eval": _Command(eval, code),
        "builtins.exec": _Command(exec, code),
    }


@pytest.mark.parametrize("refused", ["posix.system", "subprocess.call", "builtins.eval", "builtins.exec"])
def test_command_pickle_is_refused_without_running(refused, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(_attacks(marker)[refused]))
    with pytest.raises(TokenizerError, match=f"refusing to unpickle global '{refused}'"):
        load_tiktoken_pickle(path)
    assert not marker.exists(), f"{refused} ran while loading"


def _encoding_pickle(state):
    """A pickle that names tiktoken.core.Encoding and hands it `state`, as pickle.dump(Encoding) does."""
    body = pickle.dumps(state, protocol=3)[2:-1]  # drop PROTO and STOP; protocol 3 has bytes but no frames
    return b"\x80\x03ctiktoken.core\nEncoding\n)\x81" + body + b"b."


def test_encoding_pickle_helper_is_faithful(enc):
    state = {"name": "x", "pat_str": enc._pat_str, "mergeable_ranks": {bytes([i]): i for i in range(256)},
             "special_tokens": {BOS: 256}}
    assert pickle.loads(_encoding_pickle(state)).encode("hi<|bos|>", allowed_special="all") == [104, 105, 256]


def test_command_inside_encoding_state_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "tokenizer.pkl"
    evil = _Command(os.system, f"touch {marker}")
    path.write_bytes(_encoding_pickle({"name": "x", "pat_str": "x", "mergeable_ranks": {b"a": evil},
                                       "special_tokens": {}}))
    with pytest.raises(TokenizerError, match="refusing to unpickle global 'posix.system'"):
        load_tiktoken_pickle(path)
    assert not marker.exists(), "the command inside the Encoding state ran"


@pytest.mark.parametrize("obj, kind", [({"name": "rustbpe"}, "dict"), ([1, 2, 3], "list"), ("rustbpe", "str")])
def test_wrong_type_pickle_is_refused(obj, kind, tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(TokenizerError, match=f"expected a pickled tiktoken.Encoding, got {kind}"):
        load_tiktoken_pickle(path)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"name": "x", "pat_str": "x", "mergeable_ranks": {"a": 0}, "special_tokens": {}},
         r"mergeable_ranks must be dict\[bytes, int\]"),
        ({"name": "x", "pat_str": "x", "mergeable_ranks": {}, "special_tokens": {"a": "0"}},
         r"special_tokens must be dict\[str, int\]"),
        ({"name": "x", "pat_str": "x"}, "must be a dict with keys"),
        ("cl100k_base", "registered tiktoken encoding 'cl100k_base'"),
    ],
)
def test_malformed_encoding_state_is_refused(state, message, tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_encoding_pickle(state))
    with pytest.raises(TokenizerError, match=message):
        load_tiktoken_pickle(path)


def test_truncated_pickle_is_refused(model_dir, tmp_path):
    data = (model_dir / "tokenizer.pkl").read_bytes()
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match="not a readable pickle"):
        load_tiktoken_pickle(path)


def test_missing_pickle_is_refused(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        load_tiktoken_pickle(tmp_path / "nope.pkl")


def test_pickle_round_trip(enc, model_dir):
    loaded = load_tiktoken_pickle(model_dir / "tokenizer.pkl")
    assert loaded._mergeable_ranks == enc._mergeable_ranks and loaded._special_tokens == enc._special_tokens
    assert loaded._pat_str == enc._pat_str and loaded.name == enc.name, "round trip lost the pattern or name"


# --- token_bytes.pt ---------------------------------------------------------------------------------------


def test_token_bytes(enc, tmp_path):
    write_token_bytes(enc, tmp_path / "token_bytes.pt")
    tb = torch.load(tmp_path / "token_bytes.pt", weights_only=True)
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB_SIZE,), f"got {tb.dtype} {tuple(tb.shape)}"
    expected = [len(t) for t, _ in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])] + [0] * 9
    assert tb.tolist() == expected, "token_bytes must be each token's byte length, 0 for specials"
    assert (tb[:256] == 1).all() and (tb[N_RANKS:] == 0).all() and tb[256:N_RANKS].min() >= 2


# --- HF conversion ----------------------------------------------------------------------------------------


def test_conversion_keeps_published_config_and_is_idempotent(model_dir):
    orig = json.loads((model_dir / "tokenizer_config.orig.json").read_text())
    assert orig == PUBLISHED_CONFIG, "the published tokenizer_config.json was not kept"
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert "auto_map" not in cfg and cfg["tokenizer_class"] == "CognicaTokenizerFast"
    assert cfg["bos_token"] == cfg["eos_token"] == BOS and cfg["model_max_length"] == 1024
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    convert_tokenizer(model_dir)
    after = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert before == after, "a second conversion changed the directory"


def test_conversion_to_out_dir_leaves_model_dir(model_dir, tmp_path):
    before = sorted(p.name for p in model_dir.iterdir())
    convert_tokenizer(model_dir, tmp_path / "out")
    assert sorted(p.name for p in model_dir.iterdir()) == before
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()


def test_hf_special_tokens(hf, raw, enc):
    assert type(hf).__name__ == "CognicaTokenizerFast", f"AutoTokenizer gave {type(hf).__name__}"
    assert len(hf) == raw.get_vocab_size() == VOCAB_SIZE
    assert hf.bos_token_id == hf.eos_token_id == BOS_ID
    for s, i in enc._special_tokens.items():
        assert hf.convert_tokens_to_ids(s) == raw.token_to_id(s) == i, f"{s} is not at id {i}"


@pytest.mark.parametrize("text", CORPUS)
def test_ids_match_tiktoken(text, enc, hf, raw):
    expected = tiktoken_ids(enc, text)
    assert raw.encode(text, add_special_tokens=False).ids == expected, "tokenizers.Tokenizer differs"
    assert hf.encode(text, add_special_tokens=False) == expected, "AutoTokenizer differs"
    with_bos = expected if expected[:1] == [BOS_ID] else [BOS_ID] + expected
    assert hf.encode(text) == hf(text)["input_ids"] == with_bos, "AutoTokenizer with BOS differs"


@pytest.mark.parametrize("text", PLAIN)
def test_plain_text_is_bos_plus_encode_ordinary(text, enc, hf, raw):
    expected = [BOS_ID] + enc.encode_ordinary(text)
    assert hf.encode(text) == raw.encode(text).ids == expected


def test_ids_match_tiktoken_on_stdlib_sources(enc, raw, hf):
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))[::10]
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    got = [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)]
    bad = [str(p) for p, g, t in zip(files, got, texts, strict=True) if g != enc.encode_ordinary(t)]
    assert not bad, f"ids differ from tiktoken on {bad}"
    assert hf(texts[:5])["input_ids"] == [[BOS_ID] + enc.encode_ordinary(t) for t in texts[:5]]


# --- BOS rule ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["hello", "<|bos|>hello", "<|bos|>", ""])
def test_bos_is_prepended_once(text, hf):
    for ids in (hf.encode(text), hf(text)["input_ids"], hf([text, "x"])["input_ids"][0]):
        assert ids[:1] == [BOS_ID] and ids[1:2] != [BOS_ID], f"{text!r} -> {ids[:4]}"


def test_explicit_bos_is_kept_without_special_tokens(hf):
    assert hf.encode("<|bos|>hello", add_special_tokens=False)[:1] == [BOS_ID]
    assert hf.encode("hello", add_special_tokens=False)[:1] != [BOS_ID]


def test_bos_inside_text_is_kept(hf, enc):
    text = "a<|bos|>b"
    assert hf.encode(text) == [BOS_ID] + tiktoken_ids(enc, text), "only a leading BOS may be merged"


# --- decoding ---------------------------------------------------------------------------------------------


def test_decode_matches_tiktoken(enc, hf, raw):
    rng = random.Random(0)
    cases = [tiktoken_ids(enc, t) for t in CORPUS]
    cases += [ids[:k] for ids in cases for k in range(0, len(ids), 3)]  # cuts inside multi-byte characters
    cases += [[rng.randrange(VOCAB_SIZE) for _ in range(rng.randrange(1, 20))] for _ in range(300)]
    cases += [[0xE6, 0x97], [0xF0, 0x9F, 0x98], [0xFF, 0x80, 0x41], [BOS_ID, 0xC3]]
    for ids in cases:
        expected = enc.decode(ids, errors="replace")
        assert raw.decode(ids, skip_special_tokens=False) == expected, f"tokenizers decode differs on {ids}"
        assert hf.decode(ids, skip_special_tokens=False) == expected, f"AutoTokenizer decode differs on {ids}"


def test_decode_skips_specials_on_request(enc, hf):
    ids = tiktoken_ids(enc, "<|bos|>hi<|user_start|>there<|user_end|>")
    assert hf.decode(ids, skip_special_tokens=True) == "hithere"


# --- the converted-tokenizer cache: AutoTokenizer.from_pretrained on a directory with tokenizer.pkl only -----------

# the published tokenizer_config.json: its class resolves to ours (cognica.tokenizer), its auto_map is never followed
PUBLISHED_TOKENIZER_CONFIG = {"tokenizer_class": "CognicaPoETokenizer",
                              "auto_map": {"AutoTokenizer": ["tokenization_cognica_poe.CognicaPoETokenizer", None]}}


@pytest.fixture(scope="module")
def published_dir(enc, tmp_path_factory):
    return pickle_dir(tmp_path_factory.mktemp("published"), enc, PUBLISHED_TOKENIZER_CONFIG)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cognica-cache"
    monkeypatch.setenv("COGNICA_CACHE_DIR", str(d))
    return d


def cognica_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("cognica") and r.levelno >= logging.WARNING]


def entry_files(entry: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(entry.iterdir())}


def assert_tiktoken_ids(tok, enc, what: str) -> None:
    for text in PLAIN:
        assert tok.encode(text) == [BOS_ID, *enc.encode_ordinary(text)], f"{what}: ids differ from tiktoken on {text!r}"


@pytest.mark.parametrize("how", CACHE_DAMAGES)
def test_damaged_cache_entry_is_reconverted_with_one_warning(how, published_dir, cache, enc, caplog):
    entry = converted_tokenizer(published_dir / "tokenizer.pkl")
    good = entry_files(entry)
    damage_cache_entry(entry, how)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        tok = AutoTokenizer.from_pretrained(published_dir)
    assert_tiktoken_ids(tok, enc, f"after a {how} cache entry")
    warnings = cognica_warnings(caplog)
    assert len(warnings) == 1 and str(entry) in warnings[0], f"one warning naming {entry} expected: {warnings}"
    assert entry_files(entry) == good, f"the {how} entry was not replaced by the converter's output"


def test_concurrent_conversions_of_a_damaged_entry_all_get_a_complete_one(published_dir, cache, caplog):
    pkl = published_dir / "tokenizer.pkl"
    entry = converted_tokenizer(pkl)
    good = entry_files(entry)
    damage_cache_entry(entry, "truncated")
    start, seen, errors = threading.Barrier(4), [], []

    def load() -> None:
        start.wait()
        try:
            seen.append(entry_files(converted_tokenizer(pkl)))  # read at once: a half-written entry would show here
        except Exception as e:  # collected so the assert below names it
            errors.append(repr(e))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors and len(seen) == 4, f"a concurrent conversion failed: {errors}"
    assert all(files == good for files in seen), "a concurrent caller read an incomplete or damaged entry"
    warnings = cognica_warnings(caplog)
    assert len(warnings) == 1 and str(entry) in warnings[0], f"one repair for all callers expected: {warnings}"


def test_unwritable_cache_converts_privately_with_one_warning(published_dir, tmp_path, monkeypatch, enc, caplog):
    location = unwritable_cache_dir(tmp_path)
    monkeypatch.setenv("COGNICA_CACHE_DIR", str(location))
    with caplog.at_level(logging.WARNING):
        first = AutoTokenizer.from_pretrained(published_dir)
        second = AutoTokenizer.from_pretrained(published_dir)
    assert_tiktoken_ids(first, enc, "first load with an unwritable cache")
    assert_tiktoken_ids(second, enc, "second load with an unwritable cache")
    warnings = cognica_warnings(caplog)
    assert len(warnings) == 1 and str(location) in warnings[0] and "COGNICA_CACHE_DIR" in warnings[0], \
        f"one warning naming {location} and COGNICA_CACHE_DIR expected: {warnings}"


def test_private_conversion_is_removed_at_exit(published_dir, tmp_path):
    code = ("import os, cognica\nfrom cognica.tokenizer import converted_tokenizer\n"
            f"d = converted_tokenizer({str(published_dir / 'tokenizer.pkl')!r})\n"
            "print('RESULT=' + str(d) + '|' + str(os.path.isfile(d / 'tokenizer.json')))")
    proc = run_python(code, {"COGNICA_CACHE_DIR": str(unwritable_cache_dir(tmp_path))})
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT=")), None)
    assert line, f"the load failed with an unwritable cache (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    private, existed = line[len("RESULT="):].split("|")
    assert existed == "True", f"{private} held no tokenizer.json while the process ran"
    assert not Path(private).exists(), f"the private conversion {private} outlived its process"


def test_refused_pickle_stops_the_load_with_its_line_when_the_cache_is_unwritable(tmp_path, monkeypatch, caplog):
    d, marker = tmp_path / "hostile", tmp_path / "PICKLE_RAN"
    d.mkdir()
    make_hostile(d, marker)
    (d / "tokenizer_config.json").write_text(json.dumps(PUBLISHED_TOKENIZER_CONFIG))
    monkeypatch.setenv("COGNICA_CACHE_DIR", str(unwritable_cache_dir(tmp_path)))
    with caplog.at_level(logging.WARNING), pytest.raises(TokenizerError) as refused:
        AutoTokenizer.from_pretrained(d)
    message = str(refused.value)
    assert message.startswith(f"{d / 'tokenizer.pkl'}: refusing to unpickle global 'posix.system'") and \
        "\n" not in message, f"the refusal must be today's one line naming the file: {message!r}"
    assert not cognica_warnings(caplog), f"a refused pickle must give its line only: {cognica_warnings(caplog)}"
    assert not marker.exists(), "the hostile pickle ran"
