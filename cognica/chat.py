"""The opt-in chat template for SFT checkpoints of this family (nanochat's chat format).

The base models are not chat models, so no template is set by default. For an SFT checkpoint, pass the file to the
engine: `--chat-template "$(cognica chat-template)"` (vLLM and SGLang), or `tokenizer.chat_template =
cognica.chat.chat_template()` in transformers. The assistant's turn ends at `STOP_TOKEN`; the engines stop there
when it is the request's stop token (`"stop": ["<|assistant_end|>"]`) or the checkpoint's `eos_token_id`.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
STOP_TOKEN = "<|assistant_end|>"


def chat_template() -> str:
    """The Jinja template text."""
    return TEMPLATE_PATH.read_text()
