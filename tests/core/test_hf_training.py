"""The transformers class as the Hugging Face ecosystem expects a causal LM (issue 28 items 1-3): the published
tensor names at the top level (save_pretrained round trip), config.name_or_path, gates that are not nn.Linear,
forward with labels and padding masks, training (gradients, gradient checkpointing, Trainer, PEFT's all-linear),
and batched left-padded generate / pipeline equal to each prompt alone. Oracle: `cognica.model` (float32)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cognica.checkpoint import open_checkpoint
from cognica.hf import CognicaPoEForCausalLM, register
from cognica.model import CognicaGPT, Gate, load_reference

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a"]
PROJECTIONS = {"attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}


@pytest.fixture(scope="module")
def hf(tiny_ckpt: Path) -> CognicaPoEForCausalLM:
    from transformers import AutoModelForCausalLM

    register()
    return AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def ref(tiny_ckpt: Path) -> CognicaGPT:
    return load_reference(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(tiny_ckpt: Path):
    from transformers import AutoTokenizer

    register()
    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    tok.pad_token, tok.padding_side = tok.bos_token, "left"  # the README's advice for batched generation
    return tok


def read_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_save_pretrained_writes_the_published_layout_bit_exactly(tiny_ckpt: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    register()
    model = AutoModelForCausalLM.from_pretrained(tiny_ckpt, dtype="auto")  # the published bf16
    model.save_pretrained(tmp_path / "saved")
    published, saved = read_file(tiny_ckpt / "model.safetensors"), read_file(tmp_path / "saved" / "model.safetensors")
    assert sorted(saved) == sorted(published), \
        f"save_pretrained names differ from the published ones: {sorted(set(saved) ^ set(published))[:6]}"
    changed = [k for k in published if saved[k].dtype != published[k].dtype or not torch.equal(saved[k], published[k])]
    assert not changed, f"save_pretrained changed tensors {changed[:6]}"
    open_checkpoint(tmp_path / "saved")  # what `cognica inspect` and both engines validate
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype="auto")
    assert again.dtype == torch.bfloat16, f"the saved config must reload in bf16, got {again.dtype}"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values())), \
        "from_pretrained(save_pretrained(...)) must give the same tensors"


def test_from_pretrained_sets_config_name_or_path(hf: CognicaPoEForCausalLM, tiny_ckpt: Path):
    # llm-compressor's oneshot (and other tools) reload the config from config.name_or_path
    assert hf.config.name_or_path == str(tiny_ckpt), f"config.name_or_path is {hf.config.name_or_path!r}"


def test_state_dict_is_the_reference_layout(hf: CognicaPoEForCausalLM, ref: CognicaGPT):
    assert list(hf.state_dict()) == list(ref.state_dict()), "the transformers class must hold the published names"
    assert hf.get_output_embeddings() is hf.lm_head and hf.get_input_embeddings() is hf.transformer.wte


def test_gates_are_not_linear_layers(hf: CognicaPoEForCausalLM):
    linear = {n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {f"transformer.h.{i}.{p}" for i in range(hf.config.n_layer) for p in PROJECTIONS} | {"lm_head"}
    assert linear == expected, f"nn.Linear modules beyond the projections and the head: {sorted(linear - expected)}"
    gates = [n for n, m in hf.named_modules() if isinstance(m, Gate)]
    assert "smear_gate" in gates and any(n.endswith("attn.ve_gate") for n in gates), f"gates found: {gates}"


def test_peft_all_linear_targets_the_projections_only(hf: CognicaPoEForCausalLM):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    expected = {f"transformer.h.{i}.{p}" for i in range(hf.config.n_layer) for p in PROJECTIONS}
    assert adapted == expected, f"all-linear adapted {sorted(adapted ^ expected)[:6]} wrongly"


def test_labels_give_the_shifted_cross_entropy(hf: CognicaPoEForCausalLM, ref: CognicaGPT):
    ids = torch.randint(0, 32759, (2, 40), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :7] = -100
    labels[1, 30:] = -100
    with torch.no_grad():
        out = hf(input_ids=ids, labels=labels)
        lp = torch.log_softmax(ref(ids).double(), dim=-1)
    keep = labels[:, 1:] != -100
    nll = -lp[:, :-1].gather(2, ids[:, 1:, None])[..., 0][keep]
    assert type(out).__name__ == "CausalLMOutputWithPast", type(out).__name__
    assert out.loss is not None and out.loss.dtype == torch.float32, "labels must give a float32 loss"
    assert abs(out.loss.item() - nll.mean().item()) < 1e-5, f"loss {out.loss.item()} != CE {nll.mean().item()}"
    summed = hf(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(50)).loss.item()
    assert abs(summed - nll.sum().item() / 50) < 1e-4, "num_items_in_batch must divide the summed loss"


def test_left_padded_rows_equal_each_row_alone(hf: CognicaPoEForCausalLM, ref: CognicaGPT):
    # one row crosses the 256-key S window, the other is short: positions must start at each row's first token
    g = torch.Generator().manual_seed(2)
    rows = [[32759] + torch.randint(0, 32759, (n,), generator=g).tolist() for n in (299, 40)]
    ids, mask = left_padded(rows, pad=32759)
    with torch.no_grad():
        batched = hf(input_ids=ids, attention_mask=mask).logits
        other_pad = hf(input_ids=ids.masked_fill(mask == 0, 7), attention_mask=mask).logits
        for b, row in enumerate(rows):
            alone = ref(torch.tensor([row]))[0]
            torch.testing.assert_close(batched[b, -len(row):], alone, atol=2e-4, rtol=0,
                                       msg=f"row {b} of a left-padded batch differs from the row alone")
            assert torch.equal(batched[b, -len(row):].argmax(-1), alone.argmax(-1)), f"row {b}: argmax differs"
    real = mask.bool()
    assert torch.equal(batched[real], other_pad[real]), "a padded position must never be attended"


def test_gradients_reach_every_parameter_in_train_mode(hf: CognicaPoEForCausalLM):
    model = copy.deepcopy(hf).train()
    ids = torch.randint(0, 32759, (2, 24), generator=torch.Generator().manual_seed(3))
    model(input_ids=ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing, f"no gradient reached {missing[:6]}"


def test_gradient_checkpointing_gives_the_same_gradients(hf: CognicaPoEForCausalLM):
    ids = torch.randint(0, 32759, (2, 24), generator=torch.Generator().manual_seed(4))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(hf).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing, "gradient_checkpointing_enable must switch it on"
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5,
                                   msg=f"gradient checkpointing changed the gradient of {name}")


def test_trainer_lowers_the_loss(hf: CognicaPoEForCausalLM, tok, tmp_path: Path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    text = ["The quick brown fox jumps over the lazy dog.", "A stitch in time saves nine."] * 2
    data = [tok(t) for t in text]
    model = copy.deepcopy(hf)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=3e-3, report_to=[], save_strategy="no", use_cpu=True, logging_steps=1,
                             disable_tqdm=True)
    tok.padding_side = "right"
    try:
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
        trainer.train()
    finally:
        tok.padding_side = "left"
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], f"Trainer's loss did not fall: {losses}"


def test_batched_left_padded_generate_equals_each_prompt_alone(hf: CognicaPoEForCausalLM, tok):
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all()), "the prompts must need padding"
    out = hf.generate(**batch, max_new_tokens=6, do_sample=False)
    for i, prompt in enumerate(PROMPTS):
        alone = hf.generate(tok(prompt, return_tensors="pt")["input_ids"], max_new_tokens=6, do_sample=False)
        assert out[i, -6:].tolist() == alone[0, -6:].tolist(), f"prompt {i}: batched tokens differ from alone"


def test_batched_pipeline_equals_each_prompt_alone(hf: CognicaPoEForCausalLM, tok):
    from transformers import pipeline

    pipe = pipeline("text-generation", model=hf, tokenizer=tok)
    batched = pipe(PROMPTS, batch_size=2, max_new_tokens=8, do_sample=False)
    alone = [pipe(p, max_new_tokens=8, do_sample=False) for p in PROMPTS]
    assert batched == alone, f"pipeline(batch_size=2) differs from one prompt at a time:\n{batched}\n{alone}"


@pytest.mark.parametrize("keyword", [{"output_attentions": False, "output_hidden_states": False},
                                     {"num_beams": 1, "num_return_sequences": 1, "streamer": None},
                                     {"logits_processor": [], "stopping_criteria": None, "synced_gpus": False}])
def test_generate_accepts_what_transformers_passes_by_default(hf: CognicaPoEForCausalLM, tok, keyword: dict):
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    plain = hf.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(hf.generate(ids, max_new_tokens=4, do_sample=False, **keyword), plain), f"{keyword} changed it"


@pytest.mark.parametrize("keyword", [{"num_beams": 2}, {"num_return_sequences": 2}, {"output_scores": True},
                                     {"logits_processor": [lambda ids, scores: scores]}, {"min_new_tokens": 3}])
def test_generate_refuses_keywords_that_change_the_output(hf: CognicaPoEForCausalLM, tok, keyword: dict):
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=next(iter(keyword))):
        hf.generate(ids, max_new_tokens=4, **keyword)


def test_generate_refuses_right_padding(hf: CognicaPoEForCausalLM, tok):
    tok.padding_side = "right"
    try:
        batch = tok(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = "left"
    with pytest.raises(ValueError, match="pad on the left"):
        hf.generate(**batch, max_new_tokens=2)


def test_inputs_embeds_is_refused_clearly(hf: CognicaPoEForCausalLM):
    with pytest.raises(ValueError, match="token ids"):
        hf(inputs_embeds=torch.zeros(1, 3, hf.config.n_embd))
