"""The Hugging Face route both engines' tests take (tests/vllm/test_hf_route.py, tests/sglang/test_hf_route.py):
a full fine-tune and PEFT LoRA adapters made with the ecosystem's own tools on the transformers class, saved with
`save_pretrained`, as the README's "Fine-tune, quantize, serve" section gives them. Engine-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cognica.hf import CognicaPoEForCausalLM, register
from cognica.model import CognicaGPT

TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "All that glitters is not gold. Where there is a will, there is a way. ") * 3
RANK = 8


def train(model: torch.nn.Module, tok: Any, steps: int, lr: float) -> list[float]:
    """`steps` AdamW steps of next-token loss on TEXT (two rows, right-padded with a masked pad); the losses."""
    batch = tok([TEXT, TEXT[:120]], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def as_reference(model: CognicaPoEForCausalLM) -> CognicaGPT:
    """The pure-torch reference holding the transformers model's weights (the same names)."""
    ref = CognicaGPT(model.arch)
    ref.load_state_dict(model.state_dict())
    return ref.float().eval()


def fine_tune_and_adapt(src: Path, root: Path, adapters: dict[str, str | list[str]]) -> dict[str, Any]:
    """3 AdamW steps of full fine-tuning of `src` saved to root/"sft" (model and tokenizer); then, per entry of
    `adapters` (name -> PEFT target_modules), a rank-8 LoRA on the fine-tuned model, 3 steps, saved to root/name.
    Returns {"base": reference of src, "sft": (dir, trained reference), name: (dir, PEFT's merged reference)}."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register()
    tok = AutoTokenizer.from_pretrained(src)
    tok.pad_token = tok.bos_token
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    base = as_reference(model)
    losses = train(model, tok, steps=3, lr=1e-3)
    assert losses[-1] < losses[0], f"full fine-tune did not lower the loss: {losses}"
    model.save_pretrained(root / "sft")
    tok.save_pretrained(root / "sft")
    out: dict[str, Any] = {"base": base, "sft": (root / "sft", as_reference(model))}
    for name, targets in adapters.items():
        trained = AutoModelForCausalLM.from_pretrained(root / "sft", dtype=torch.float32)
        peft_model = get_peft_model(trained, LoraConfig(r=RANK, lora_alpha=16, target_modules=targets,
                                                        lora_dropout=0.0))
        losses = train(peft_model, tok, steps=3, lr=1e-2)
        assert losses[-1] < losses[0], f"LoRA ({name}) did not lower the loss: {losses}"
        peft_model.save_pretrained(root / name)
        # PEFT's own merge of the saved adapter onto a fresh load of the fine-tuned model: the oracle
        fresh = AutoModelForCausalLM.from_pretrained(root / "sft", dtype=torch.float32)
        out[name] = (root / name, as_reference(PeftModel.from_pretrained(fresh, root / name).merge_and_unload()))
    return out


def max_logit_change(a: CognicaGPT, b: CognicaGPT, prompt: list[int]) -> float:
    """How far training moved the logits on `prompt` (a test that could not see a stale load asserts it is large)."""
    with torch.no_grad():
        return (a(torch.tensor([prompt])) - b(torch.tensor([prompt]))).abs().max().item()
