"""The opt-in chat template (`cognica/chat_template.jinja`) renders nanochat's chat format token for token.

The expected ids are built here from the tiktoken Encoding directly, turn by turn (nanochat renders each text part
with `encode_ordinary` between special ids; a leading system message merges into the first user message with a
blank line between), and compared with what transformers' `apply_chat_template` gives through our converted
tokenizer, which is what vLLM and SGLang run for `--chat-template`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from cognica.chat import STOP_TOKEN, TEMPLATE_PATH, chat_template
from cognica.factory_tokenizer import train_factory_encoding
from cognica.hf_tokenizer import register_tokenizer
from cognica.tokenizer import convert_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour.\nOne word."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about   spaces  ."}],
]


@pytest.fixture(scope="module")
def enc():
    return train_factory_encoding(0)


@pytest.fixture(scope="module")
def tok(enc, tmp_path_factory):
    import pickle

    d = tmp_path_factory.mktemp("chat")
    with open(d / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    (d / "config.json").write_text(json.dumps({"sequence_len": 1024}))
    convert_tokenizer(d)
    register_tokenizer()
    return AutoTokenizer.from_pretrained(d)


def nanochat_ids(enc, messages: list[dict], generation_prompt: bool) -> list[int]:
    special = enc.encode_single_token
    if messages[0]["role"] == "system":
        merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
        messages = [{"role": "user", "content": merged}, *messages[2:]]
    ids = [special("<|bos|>")]
    for m in messages:
        start, end = ("<|user_start|>", "<|user_end|>") if m["role"] == "user" else \
            ("<|assistant_start|>", "<|assistant_end|>")  # fmt: skip
        ids += [special(start), *enc.encode_ordinary(m["content"]), special(end)]
    return ids + ([special("<|assistant_start|>")] if generation_prompt else [])


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_template_renders_nanochats_ids(tok, enc, i, generation_prompt):
    messages = CONVERSATIONS[i]
    got = tok.apply_chat_template(messages, chat_template=chat_template(), add_generation_prompt=generation_prompt,
                                  tokenize=True, return_dict=False)  # fmt: skip
    got = got["input_ids"] if isinstance(got, dict) else list(got)
    assert got == nanochat_ids(enc, messages, generation_prompt), tok.decode(got)
    assert got.count(enc.encode_single_token("<|bos|>")) == 1, "BOS must appear once"


def test_stop_token_is_the_assistant_end_id(tok, enc):
    assert tok.convert_tokens_to_ids(STOP_TOKEN) == enc.encode_single_token("<|assistant_end|>") == 32763


@pytest.mark.parametrize("messages, error", [
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "turns must alternate"),
])  # fmt: skip
def test_template_refuses_what_nanochat_refuses(tok, messages, error):
    with pytest.raises(Exception, match=error):
        tok.apply_chat_template(messages, chat_template=chat_template(), tokenize=False)


def test_cli_prints_the_template_path():
    out = subprocess.run([sys.executable, "-m", "cognica", "chat-template"], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.strip() == str(TEMPLATE_PATH) and TEMPLATE_PATH.is_file()
