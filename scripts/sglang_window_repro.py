"""Minimal reproduction of SGLang 0.5.23's triton-backend decode window, one key short, on an in-tree model.

A tiny random Gemma-2 (SGLang's own `Gemma2ForCausalLM`, sliding window 8 on every other layer) served with
`attention_backend="triton"`, against transformers' eager `Gemma2ForCausalLM` on the same weights, float32: the
prompt's log-probs (extend) match, the decoded tokens' log-probs match up to position `sliding_window - 1` and
differ from there on. Cause: `update_sliding_window_buffer` (sglang/srt/layers/attention/triton_backend.py) gathers
`min(seq_lens, sliding_window_size)` keys for decode, and `seq_lens` already counts the query, while the extend
kernel keeps `sliding_window_size` keys before the query (`q <= k + W`): decode sees one key fewer than extend.

Runs on a CPU through Triton's interpreter (about 2 minutes on 2 cores), from the repository root:
    TRITON_INTERPRET=1 SGLANG_USE_CPU_ENGINE=1 PYTHONPATH="$(.venv/sglang/bin/cognica sglang-cpu-path)" \
        .venv/sglang/bin/python scripts/sglang_window_repro.py
Prints one row per decoded position and exits 1 when the defect shows (any |difference| > 1e-3), 0 otherwise.
"""

from __future__ import annotations

import sys
import tempfile

import torch

WINDOW = 8  # HF's sliding_window: a query sees itself and the 7 keys before it
PROMPT, NEW = 6, 10  # decode positions 6..15 cross the window at position 8


def main() -> int:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=WINDOW,
                       max_position_embeddings=128,
                       hidden_act="gelu_pytorch_tanh", attn_implementation="eager")  # SGLang reads hidden_act
    torch.manual_seed(0)
    hf = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger attention logits than the default init, so a missing key shows
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
    prompt = torch.randint(1, 256, (PROMPT,)).tolist()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        import sglang

        engine = sglang.Engine(model_path=d, device="cpu", attention_backend="triton", disable_cuda_graph=True,
                               dtype="float32", skip_server_warmup=True, skip_tokenizer_init=True,
                               max_total_tokens=2048, log_level="error")
        try:
            out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": NEW, "temperature": 0.0,
                                                                     "ignore_eos": True}, return_logprob=True)
        finally:
            engine.shutdown()
    ids = prompt + out["output_ids"]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    worst = 0.0
    print("position  sglang-triton  transformers  difference")
    for i, (lp, tok, _) in enumerate(out["meta_info"]["output_token_logprobs"]):
        pos = PROMPT + i
        want = ref[pos - 1, tok].item()
        worst = max(worst, abs(lp - want))
        print(f"{pos:8d}  {lp:13.6f}  {want:12.6f}  {lp - want:+.2e}")  # pos: the predicted token's position
    print(f"largest difference {worst:.2e} (decode from position {WINDOW - 1} on sees one key fewer than it should)")
    return 1 if worst > 1e-3 else 0


if __name__ == "__main__":
    sys.exit(main())
