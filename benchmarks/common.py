"""Shared pieces of the serving benchmark (benchmarks/serve.py and its per-engine workers).

Imported by the workers, which run in different venvs (.venv/vllm, .venv/sglang): standard library only at import
time. `python benchmarks/common.py prepare CACHE_DIR` (run with .venv/vllm's python) writes the two checkpoints:
the full-size factory checkpoint of our model and its in-tree Llama twin of equal width/depth/heads/context/vocab.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cognica.config import CognicaConfig

BOS = 32759
REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / "benchmarks" / ".cache"
COGNICA_DIR = "cognica-full"
LLAMA_DIR = "llama-twin"
RESULT_PREFIX = "RESULT="
PROGRESS_PREFIX = "PROGRESS "


@dataclass(frozen=True)
class Workload:
    name: str
    n_seqs: int
    prompt_len: int
    new_tokens: int
    metric: str  # "gen" (generated tokens/s) or "prefill" (prompt tokens/s)

    def prompts(self, seed: int = 1234) -> list[list[int]]:
        """Random token-id prompts that start with <|bos|>; the same for every engine."""
        rng = random.Random(f"{self.name}-{seed}")
        return [[BOS] + [rng.randrange(0, BOS) for _ in range(self.prompt_len - 1)] for _ in range(self.n_seqs)]


# The issue's workloads. On this 2-core AVX2 machine bf16 GEMMs run at ~13 prompt tok/s for this model, so these
# take ~20 min per engine (about 1.6 h for the five): run them with --issue-workloads.
ISSUE_WORKLOADS = [
    Workload("1 seq 128+128", 1, 128, 128, "gen"),
    Workload("16 seq 128+128", 16, 128, 128, "gen"),
    Workload("prefill 8x1024", 8, 1024, 1, "prefill"),
    Workload("long 1800+128", 1, 1800, 128, "gen"),
]
# The default: the same four kinds scaled so the five engines fit in 30 minutes on this machine (decode at 16
# sequences is still 32 steps of a 16-wide batch; the long prompt still crosses the 513-key S windows). bf16 GEMMs
# with more than one row run at ~5-13 prompt tok/s here (no AVX-512/AMX), so prompt tokens are what costs.
WORKLOADS = [
    Workload("1 seq 32+32", 1, 32, 32, "gen"),
    Workload("16 seq 8+32", 16, 8, 32, "gen"),
    Workload("prefill 2x64", 2, 64, 1, "prefill"),
    Workload("long 560+8", 1, 560, 8, "gen"),
]
QUICK_WORKLOADS = [  # --quick: tiny, for trying the script out
    Workload("1 seq 16+4", 1, 16, 4, "gen"),
    Workload("16 seq 8+4", 16, 8, 4, "gen"),
    Workload("prefill 2x32", 2, 32, 1, "prefill"),
    Workload("long 300+4", 1, 300, 4, "gen"),
]
WARMUP = Workload("warm-up", 2, 8, 2, "gen")


def workloads_from_json(items: list[dict]) -> list[Workload]:
    return [Workload(**w) for w in items]


def workloads_to_json(items: list[Workload]) -> list[dict]:
    return [asdict(w) for w in items]


def progress(msg: str) -> None:
    """A line the driver echoes live (workers' engine logs go to a file)."""
    print(f"{PROGRESS_PREFIX}{msg}", flush=True)


def emit(result: dict, final: bool = False) -> None:
    """The worker's results so far (the driver keeps the last line, so a timeout keeps finished workloads)."""
    print(RESULT_PREFIX + json.dumps({**result, "complete": final}), flush=True)


def measurement(w: Workload, wall_s: float, ttft_s: float | None, ttft_max_s: float | None, ttft_how: str,
                outputs: list[list[int]]) -> dict:
    n_gen = sum(len(o) for o in outputs)
    assert all(len(o) == w.new_tokens for o in outputs), f"{w.name}: expected {w.new_tokens} tokens per sequence, " \
        f"got {[len(o) for o in outputs]}"
    m = {"workload": w.name, "n_seqs": w.n_seqs, "prompt_len": w.prompt_len, "new_tokens": w.new_tokens,
         "wall_s": wall_s, "gen_tok_s": n_gen / wall_s, "prompt_tok_s": w.n_seqs * w.prompt_len / wall_s,
         "ttft_s": ttft_s, "ttft_max_s": ttft_max_s, "ttft_how": ttft_how}
    m["value"] = m["gen_tok_s"] if w.metric == "gen" else m["prompt_tok_s"]
    progress(f"  {w.name}: {wall_s:.1f}s, {m['gen_tok_s']:.2f} gen tok/s, {m['prompt_tok_s']:.1f} prompt tok/s, "
             f"TTFT {ttft_s if ttft_s is None else round(ttft_s, 3)}s ({ttft_how})")
    return m


def run_workloads(result: dict, spec: dict, run, request_ttfts, token_ids) -> None:
    """The engine workers' timing loop: one warm-up, then one timed `run(prompts, new_tokens) -> (wall_s, outs)`
    per workload. TTFT from the engine's per-request metrics (`request_ttfts(outs)`: seconds per request, or None
    where any is missing), else the wall time of a max_tokens=1 run of the same prompts. `token_ids(outs)` gives
    each request's generated ids. Emits the result after every workload and once more, final, at the end."""
    workloads = workloads_from_json(spec.get("workloads", []))
    if workloads:
        run(WARMUP.prompts(), WARMUP.new_tokens)
    result["measurements"] = []
    for w in workloads:
        prompts = w.prompts()
        wall, outs = run(prompts, w.new_tokens)
        ttfts = request_ttfts(outs)
        if ttfts:
            ttft, ttft_max, how = sum(ttfts) / len(ttfts), max(ttfts), "request metrics"
        elif w.new_tokens == 1:
            ttft, ttft_max, how = wall, wall, "max_tokens=1 wall"
        else:
            t1, _ = run(prompts, 1)
            ttft, ttft_max, how = t1, t1, "max_tokens=1 wall"
        result["measurements"].append(measurement(w, wall, ttft, ttft_max, how, token_ids(outs)))
        emit(result)
    emit(result, final=True)


def gpu_kit(name: str) -> ModuleType:
    """A module of the GPU kit, benchmarks/gpu/ (which imports its modules by their bare names, as these do)."""
    kit = str(Path(__file__).resolve().parent / "gpu")
    if kit not in sys.path:
        sys.path.insert(0, kit)
    return importlib.import_module(name)


def kv_theory(cfg: CognicaConfig | None = None, ctx: int | None = None, block: int = 1, in_flight: int = 1,
              extra_block: bool = False) -> dict:
    """KV slots one `ctx`-token sequence (default: the context) needs with the config's per-layer windows vs every
    layer full. `cfg`: a `cognica.config.CognicaConfig`, default the release's.

    A sliding layer (`cfg.is_sliding`) keeps its `cfg.window_keys` keys (the query and the `short_window` before
    it). With `block`, `in_flight` and `extra_block`, vLLM's admission rule for a sliding layer
    (`roofline.sliding_admission_blocks`); without `extra_block`, that rule less its extra block."""
    from cognica.config import CognicaConfig  # not at import time: the workers import this module bare

    roofline = gpu_kit("roofline")
    cfg = CognicaConfig() if cfg is None else cfg
    ctx = cfg.sequence_len if ctx is None else ctx
    full = roofline.cdiv(ctx, block) * block
    slots = []
    for keys, sliding in zip(cfg.window_keys, cfg.is_sliding):
        blocks = roofline.sliding_admission_blocks(keys, in_flight, block) - (not extra_block)
        slots.append(min(full, blocks * block) if sliding else full)
    n_short = sum(cfg.is_sliding)
    return {"full_slots": cfg.n_layer * full, "sssl_slots": sum(slots), "ratio": cfg.n_layer * full / sum(slots),
            "n_short": n_short, "n_full": cfg.n_layer - n_short}


# ------------------------------------------------------------------------------------------------- checkpoints


def prepare(cache: Path) -> dict:
    """Write (or reuse) both checkpoints under `cache`; return their parameter counts."""
    import torch

    from cognica.checkpoint import read_safetensors_header
    from cognica.config import SMEAR_CHANNELS, CognicaConfig
    matmul_weight_params = gpu_kit("roofline").matmul_weight_params  # the roofline's weights per decode step

    shape = CognicaConfig()  # the release's, which the full-size factory checkpoint has and the twin copies

    cache.mkdir(parents=True, exist_ok=True)
    ours = cache / COGNICA_DIR
    if not (ours / "model.safetensors").exists() or not (ours / "tokenizer.json").exists():
        from cognica.factory import make_checkpoint
        from cognica.tokenizer import convert_tokenizer

        t = time.time()
        print("writing the full-size factory checkpoint (1.38B params, bf16) ...", file=sys.stderr, flush=True)
        make_checkpoint(ours, preset="full", seed=0, progress=False)
        convert_tokenizer(ours)
        print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)

    twin = cache / LLAMA_DIR
    if not (twin / "model.safetensors").exists():
        from safetensors.torch import save_file
        from transformers import LlamaConfig, LlamaForCausalLM

        t = time.time()
        print("writing the Llama twin (random bf16 weights) ...", file=sys.stderr, flush=True)
        cfg = LlamaConfig(hidden_size=shape.n_embd, intermediate_size=shape.mlp_hidden,
                          num_hidden_layers=shape.n_layer, num_attention_heads=shape.n_head,
                          num_key_value_heads=shape.n_kv_head, head_dim=shape.head_dim,
                          max_position_embeddings=shape.sequence_len, vocab_size=shape.vocab_size,
                          tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=BOS, rope_theta=100000.0)
        cfg.torch_dtype = "bfloat16"
        cfg.architectures = ["LlamaForCausalLM"]  # SGLang needs it in config.json
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        gen = torch.Generator().manual_seed(0)
        weights = {}
        for name, p in model.state_dict().items():
            if name.endswith("norm.weight"):
                weights[name] = torch.ones(p.shape, dtype=torch.bfloat16)
            else:
                weights[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
        twin.mkdir(parents=True, exist_ok=True)
        save_file(weights, str(twin / "model.safetensors"), metadata={"format": "pt"})
        del weights
        cfg.save_pretrained(twin)
        # The same tokenizer (same vocab); the workers skip tokenizer init and feed token ids anyway.
        (twin / "tokenizer.json").write_bytes((ours / "tokenizer.json").read_bytes())
        (twin / "special_tokens_map.json").write_bytes((ours / "special_tokens_map.json").read_bytes())
        tok_cfg = json.loads((ours / "tokenizer_config.json").read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (twin / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)

    info = {}
    for key, d in (("cognica", ours), ("llama", twin)):
        header = read_safetensors_header(d / "model.safetensors")
        info[key] = {"dir": str(d), "params": sum(math.prod(e.shape) for e in header.values()), "tensors": len(header)}
    # Weights a decode step streams in full (the embedding tables, and our value-embedding tables, are gathered):
    # the roofline's matmul weights plus smear_gate; the twin's gated MLP (3 matrices), its norms and lm_head
    d, f = shape.n_embd, shape.mlp_hidden
    info["cognica"]["streamed_params"] = matmul_weight_params(shape) + SMEAR_CHANNELS
    info["llama"]["streamed_params"] = shape.n_layer * (4 * d * d + 3 * d * f + 2 * d) + shape.vocab_size * d + d
    return info


def machine_info() -> dict:
    info = {"cores": os.cpu_count(), "cpu": None, "ram_gib": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags"))
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    except (OSError, StopIteration):
        pass
    return info


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "prepare":
        sys.exit("usage: python benchmarks/common.py prepare CACHE_DIR")
    emit(prepare(Path(sys.argv[2])))
