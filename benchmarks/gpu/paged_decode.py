"""A whole-model decode step on a paged KV cache, built from our kernels: a measuring harness, not an engine.

    python benchmarks/gpu/paged_decode.py --out OUT/decode.json [--dry-run]

The model is the factory's random-weight checkpoint (`cognica.factory.make_weights`, the same tensors
`cognica make-checkpoint --preset full --seed 0` writes; generated in memory, no tokenizer, nothing on disk) loaded
into the reference `cognica.model.CognicaGPT`, whose blocks the harness runs as they are, with two pieces injected
(`CognicaBlock.forward`'s `attend` and `act`): one step is the embedding and smear, then `cognica.layers.run_layers`
(residual mixing, backout, the final exit) over the reference blocks (norm, the c_q / c_k / c_v projections, value
embeddings, rotary, QK norm), whose attention is a K/V write through a slot mapping and
`cognica_kernels.attention.paged_attention_triton` over block tables, and whose MLP is as the plugins run it with
`COGNICA_KERNELS=triton`: c_fc, the Triton `cognica_kernels.relu2.relu2_triton`, c_proj; then lm_head and the
soft-cap.
The launchers are called directly (not the dispatchers), so the dry run on CPU runs the same kernels in Triton's
interpreter.

KV layout (vLLM's, one cache per layer, `[num_blocks, 16, n_kv_head, head_dim]`): L layers hold every position
of a sequence; S layers hold a ring of `cdiv(window_left + max_chunk, 16) + 1` blocks per sequence (vLLM's rule
for a sliding layer, blocks leaving the window are reused), so SSSL's KV memory is what an engine that frees
out-of-window blocks holds. "all-full" is the same weights with every layer's window the whole context.

What it does:
1. Parity: a few prompts (one longer than the S window) prefilled in 16-token chunks, one sequence per step,
   then decoded together. fp32: greedy tokens identical to the reference's and log-probs within 1e-3
   (`cognica.parity.assert_fp32_parity`); bf16: the calibrated tolerance and near-tie rule of the engine tests
   (`cognica.parity.bf16_tolerance`, `assert_bf16_close`).
2. Timing: one decode step at context 2048 (the cache filled with random K/V), batch 1/32/256, SSSL and all-full,
   eager and captured in a CUDA graph (median of graph replays, CUDA events): tokens/s and % of the HBM roofline
   of docs/performance.md (bytes of `roofline.py`'s model / the card's data-sheet bandwidth) and of the
   same bytes at the measured copy rate. A row whose KV cache does not fit in free memory is reported, not run.
   The SSSL rows run twice (`ops`): "opt-in" as above (`COGNICA_KERNELS=triton`), and "default", the ops the
   plugins run by default as far as this machine has them: relu^2 as torch's `relu(x).square()` and attention as
   torch SDPA over each sequence's in-window pages gathered through the block table (`gpu_timing.sdpa_paged_decode`; the
   gather is timed: the engines' FA3 / FlashInfer read the pages inside the kernel, and neither engine is on the GPU
   machines, so this is a stand-in for the default path, not the engine's number). A default row's eager logits are
   compared with the opt-in model's on the same step (`logits_vs_opt_in`, max abs difference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import Timer, copy_rate_gbps, device_info, sdpa_paged_decode  # noqa: E402
from roofline import GPUS, decode_step_bytes, sliding_admission_blocks  # noqa: E402

from cognica import layers  # noqa: E402
from cognica.config import CognicaConfig  # noqa: E402
from cognica.factory import PRESETS, make_weights  # noqa: E402
from cognica.model import Attend, CognicaGPT  # noqa: E402
from cognica.parity import assert_bf16_close, assert_fp32_parity, bf16_tolerance, random_prompts  # noqa: E402
from cognica_kernels.attention import paged_attention_triton  # noqa: E402
from cognica_kernels.relu2 import relu2_triton  # noqa: E402

PAGE = 16
GPU_PROFILE = {"preset": "full", "ctx": 2048, "batches": (1, 32, 256), "prompt_lens": (5, 37, 600), "new_tokens": 8,
               "chunk": 16, "reps": 20, "warmup": 2, "copy_bytes": 1 << 30}  # fmt: skip
# The dry run's model: 2 layers (S, L), one head of 64, context 256 so the S window is 128 keys (the minimum: S
# windows are rounded up to 128); the 220-token prompt crosses it and wraps the S layer's 13-block ring.
DRY_CONFIG = {"n_layer": 2, "n_head": 1, "n_kv_head": 1, "n_embd": 64, "sequence_len": 256, "window_pattern": "SL"}
DRY_PROFILE = {"preset": "tiny", "ctx": 200, "batches": (1, 2), "prompt_lens": (5, 220), "new_tokens": 3,
               "chunk": 64, "reps": 1, "warmup": 1, "copy_bytes": 1 << 20}  # fmt: skip
KV_MARGIN_BYTES = 4 << 30  # activations, the graph pool, fragmentation


@dataclass
class Step:
    """One forward's tokens and metadata. Tokens are grouped by sequence (`query_start_loc`)."""

    seq_idx: torch.Tensor  # [B] cache row of each sequence in the step
    ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    prev_ids: torch.Tensor  # [T] int64, the previous token of the same sequence (ignored at position 0)
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, keys including this step's
    max_query_len: int
    max_seq_len: int


class PagedKVCache:
    """Per-layer paged K/V for `batch` sequences of up to `capacity` positions (see the module docstring)."""

    def __init__(self, cfg: CognicaConfig, ring_layers: tuple[bool, ...], batch: int, capacity: int, max_chunk: int,
                 dtype: torch.dtype, device: torch.device):  # fmt: skip
        full_pages = -(-capacity // PAGE)
        # vLLM 0.32's per-request bound for a sliding layer, cdiv(sliding_window - 1 + in-flight tokens, block) + 1
        # (`SlidingWindowSpec.max_admission_blocks_per_request` in vllm/v1/kv_cache_interface.py), with sliding_window =
        # window_left + 1
        ring = min(full_pages, sliding_admission_blocks(cfg.short_window + 1, max_chunk, PAGE))
        cols = torch.arange(full_pages, device=device)
        rows = torch.arange(batch, device=device)[:, None]
        self.tables = {
            "full": (rows * full_pages + cols).to(torch.int32),
            "ring": (rows * ring + cols % ring).to(torch.int32),  # position p of a ring layer: block p // 16 mod ring
        }
        self.kinds = ["ring" if r else "full" for r in ring_layers]
        blocks = {"full": batch * full_pages, "ring": batch * ring}
        shape = (PAGE, cfg.n_kv_head, cfg.head_dim)
        self.k = [torch.empty(blocks[kind], *shape, dtype=dtype, device=device) for kind in self.kinds]
        self.v = [torch.empty_like(k) for k in self.k]

    @staticmethod
    def nbytes(cfg: CognicaConfig, ring_layers: tuple[bool, ...], batch: int, capacity: int, max_chunk: int,
               dtype: torch.dtype) -> int:  # fmt: skip
        full_pages = -(-capacity // PAGE)
        ring = min(full_pages, sliding_admission_blocks(cfg.short_window + 1, max_chunk, PAGE))
        pages = sum(ring if r else full_pages for r in ring_layers)
        return 2 * batch * pages * PAGE * cfg.n_kv_head * cfg.head_dim * dtype.itemsize

    def fill_random(self) -> None:
        for t in self.k + self.v:
            t.normal_()

    def slots(self, kind: str, step: Step) -> torch.Tensor:
        """Flat slot of every token of the step: block_table[seq, pos // 16] * 16 + pos % 16."""
        token_seq = torch.repeat_interleave(step.seq_idx, step.query_start_loc.diff().long(),
                                            output_size=step.ids.shape[0])  # fmt: skip
        table = self.tables[kind]
        return table[token_seq, step.positions // PAGE].long() * PAGE + step.positions % PAGE


class PagedCognica:
    """The reference model's weights run as a paged decode step (module docstring); `ops` "opt-in" (our Triton
    attention and relu^2) or "default" (`sdpa_paged_decode` for decode steps and torch's relu^2)."""

    def __init__(self, ref: CognicaGPT, window_left: tuple[int, ...], ops: str = "opt-in"):
        cfg = ref.config
        assert cfg.n_active_layers == cfg.n_layer and cfg.poe_head == "final", \
            "the harness runs the whole model through its final head (no PoE stage prefix or Log-OP head)"
        assert ops in ("opt-in", "default"), ops
        self.ref, self.cfg, self.window_left, self.ops = ref, cfg, window_left, ops
        self.act = layers.relu2 if ops == "default" else relu2_triton  # torch's relu(x).square(), or the kernel

    def paged_attend(self, step: Step, cache: PagedKVCache) -> Attend:
        """The blocks' attention for one step (`cognica.model.Attend`, tokens [T, heads, head_dim]): this step's K/V
        written through the slot mapping, then `paged_attention_triton` over the block tables (`sdpa_paged_decode`
        for a "default" decode step). Each layer's window is this harness's (`window_left`: the whole context in
        the all-full rows), not the block's own."""
        hd = self.cfg.head_dim
        slots = {kind: cache.slots(kind, step) for kind in set(cache.kinds)}
        tables = {kind: table.index_select(0, step.seq_idx) for kind, table in cache.tables.items()}

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: int, _block_window: int) -> torch.Tensor:
            kind = cache.kinds[i]
            cache.k[i].view(-1, *k.shape[1:])[slots[kind]] = k
            cache.v[i].view(-1, *v.shape[1:])[slots[kind]] = v
            if self.ops == "default" and step.max_query_len == 1:
                return sdpa_paged_decode(q, cache.k[i], cache.v[i], tables[kind], step.seq_lens, hd**-0.5,
                                         self.window_left[i])  # fmt: skip
            return paged_attention_triton(
                q.contiguous(), cache.k[i], cache.v[i], tables[kind], step.seq_lens, step.query_start_loc,
                hd**-0.5, self.window_left[i], max_query_len=step.max_query_len, max_seq_len=step.max_seq_len,
            )  # fmt: skip

        return attend

    @torch.inference_mode()
    def forward(self, step: Step, cache: PagedKVCache) -> torch.Tensor:
        """fp32 soft-capped logits [T, vocab_size]."""
        cfg, ref = self.cfg, self.ref
        cos, sin = layers.rotary_cos_sin(step.positions, cfg.head_dim, ref.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        wte = ref.transformer.wte
        x = layers.norm(wte(step.ids))
        x_prev = layers.norm(wte(step.prev_ids.clamp(min=0)))
        x = layers.smear(x, x_prev, ref.smear_gate.weight, ref.smear_lambda, (step.positions > 0)[:, None])
        attend = self.paged_attend(step, cache)

        def run_block(i: int, x: torch.Tensor) -> torch.Tensor:
            ve = ref.value_embeds[str(i)](step.ids) if str(i) in ref.value_embeds else None
            return ref.transformer.h[i](x, ve, cos, sin, attend, self.act)

        hidden = layers.run_layers(cfg, ref, range(cfg.n_layer), run_block, x, x0=x, x_backout=None).hidden
        # the reference's single-exit head (not the PoE Log-OP one): final norm (in `readout`), lm_head, soft-cap
        return layers.softcap(ref.lm_head(hidden)[..., :cfg.vocab_size])


def _step(seq_idx: list[int], ids: list[list[int]], starts: list[int], prevs: list[int], device: torch.device) -> Step:
    """A step where sequence seq_idx[j] adds tokens ids[j] at positions starts[j].., prevs[j] before them."""
    flat = [t for chunk in ids for t in chunk]
    positions = [s + i for s, chunk in zip(starts, ids) for i in range(len(chunk))]
    prev = [p for chunk, first in zip(ids, prevs) for p in [first, *chunk[:-1]]]
    lens = [len(c) for c in ids]
    qsl = [0]
    for n in lens:
        qsl.append(qsl[-1] + n)
    seq_lens = [s + n for s, n in zip(starts, lens)]
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return Step(as_t(seq_idx, torch.long), as_t(flat, torch.long), as_t(positions, torch.long), as_t(prev, torch.long),
                as_t(qsl, torch.int32), as_t(seq_lens, torch.int32), max(lens), max(seq_lens))  # fmt: skip


@torch.inference_mode()
def paged_generate(model: PagedCognica, prompts: list[list[int]], new_tokens: int, chunk: int,
                   device: torch.device) -> tuple[list[list[int]], list[list[float]]]:  # fmt: skip
    """Greedy: each prompt prefilled alone in `chunk`-token steps, then all decoded together. (tokens, logprobs)."""
    capacity = max(len(p) for p in prompts) + new_tokens
    cache = PagedKVCache(model.cfg, model.cfg.is_sliding, len(prompts), capacity, chunk, model.ref.dtype, device)
    last_logits = []
    for b, prompt in enumerate(prompts):
        for s in range(0, len(prompt), chunk):
            piece = prompt[s : s + chunk]
            logits = model.forward(_step([b], [piece], [s], [prompt[s - 1] if s else 0], device), cache)
        last_logits.append(logits[-1])
    logits = torch.stack(last_logits)
    seqs = [list(p) for p in prompts]
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for n in range(new_tokens):
        lp = torch.log_softmax(logits.float(), dim=-1)
        nxt = lp.argmax(dim=-1)
        for b, (tok, val) in enumerate(zip(nxt.tolist(), lp.gather(1, nxt[:, None])[:, 0].tolist())):
            tokens[b].append(tok)
            logprobs[b].append(val)
            seqs[b].append(tok)
        if n + 1 == new_tokens:
            break
        step = _step(list(range(len(prompts))), [[s[-1]] for s in seqs], [len(s) - 1 for s in seqs],
                     [s[-2] for s in seqs], device)  # fmt: skip
        logits = model.forward(step, cache)
    return tokens, logprobs


class _OnDevice:
    """Lets cognica.parity's CPU-side helpers (teacher forcing) drive a reference model that lives on `device`."""

    def __init__(self, model: CognicaGPT):
        self.model = model
        self.device = model.lm_head.weight.device

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.device)).cpu()

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self.model.generate(prompts, n)


def parity(model: PagedCognica, ref32: CognicaGPT, ref16: CognicaGPT | None, profile: dict,
           device: torch.device) -> dict[str, object]:  # fmt: skip
    """fp32 (ref16 None) or bf16 parity of paged_generate against the reference; failures are recorded, and an
    exception (a kernel that does not compile, ...) is one, so the timings still run."""
    prompts = random_prompts(list(profile["prompt_lens"]))
    t0 = time.time()
    out: dict[str, object] = {"prompt_lens": list(profile["prompt_lens"]), "new_tokens": profile["new_tokens"],
                              "chunk": profile["chunk"], "tokens": [], "errors": []}  # fmt: skip
    try:
        tokens, logprobs = paged_generate(model, prompts, profile["new_tokens"], profile["chunk"], device)
    except Exception as e:
        out.update(ok=False, seconds=round(time.time() - t0, 1))
        out["errors"].append(f"paged_generate raised {type(e).__name__}: {e}")
        print(f"  parity {'fp32' if ref16 is None else 'bf16'}: FAILED {out['errors']}", flush=True)
        return out
    out["tokens"] = tokens
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        what = f"{len(prompt)}-token prompt"
        try:
            if ref16 is None:
                assert_fp32_parity(_OnDevice(ref32), prompt, toks, lps, what, n_new=profile["new_tokens"])
            else:
                tol = bf16_tolerance(_OnDevice(ref32), _OnDevice(ref16), prompt, len(toks))
                assert_bf16_close(_OnDevice(ref32), prompt, toks, lps, tol, what, n_new=profile["new_tokens"])
        except AssertionError as e:
            out["errors"].append(str(e))
    if ref16 is not None:  # informational: how many bf16 greedy tokens equal the bf16 reference's own
        same = [sum(a == b for a, b in zip(t, ref16.generate([p], len(t))[0])) for p, t in zip(prompts, tokens)]
        out["tokens_equal_bf16_reference"] = f"{sum(same)}/{sum(len(t) for t in tokens)}"
    out["ok"] = not out["errors"]
    out["seconds"] = round(time.time() - t0, 1)
    print(f"  parity {'fp32' if ref16 is None else 'bf16'}: {'ok' if out['ok'] else out['errors']}", flush=True)
    return out


def _datasheet(device: torch.device) -> tuple[str | None, float | None]:
    """(GPUS key, peak HBM bytes/s) of roofline.py for this card; H200 from its data sheet."""
    if device.type != "cuda":
        return None, None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        return "H200 (data sheet 4.8 TB/s)", 4.8e12
    for key, (bandwidth, _) in GPUS.items():
        if key.split()[0] in name:
            return key, bandwidth
    return None, None


def time_decode(ref16: CognicaGPT, profile: dict, timer: Timer, copy_gbps: float) -> list[dict[str, object]]:
    cfg, device, ctx = ref16.config, timer.device, profile["ctx"]
    card, peak = _datasheet(device)
    rows = []
    for windows in ("SSSL", "all-full"):
        sssl = windows == "SSSL"
        window_left = cfg.window_left if sssl else (cfg.sequence_len,) * cfg.n_layer
        ring_layers = cfg.is_sliding if sssl else (False,) * cfg.n_layer
        opt_in = PagedCognica(ref16, window_left)
        ops_modes = ("default", "opt-in") if sssl else ("opt-in",)
        for batch, ops in [(b, o) for b in profile["batches"] for o in ops_modes]:
            model = opt_in if ops == "opt-in" else PagedCognica(ref16, window_left, ops)
            row: dict[str, object] = {"windows": windows, "ops": ops, "batch": batch, "ctx": ctx, "graph": False,
                                      "ms": None, "tok_s": None, "eager_ms": None, "eager_tok_s": None,
                                      "pct_roofline": None, "pct_copy_roofline": None, "roofline_card": card,
                                      "logits_vs_opt_in": None, "note": None}  # fmt: skip
            rows.append(row)
            kv = PagedKVCache.nbytes(cfg, ring_layers, batch, ctx, 1, ref16.dtype)
            row["kv_gb"] = kv / 1e9
            if timer.cuda:
                free, _ = torch.cuda.mem_get_info(device)
                if kv + KV_MARGIN_BYTES > free:
                    row["note"] = f"not run: KV needs {kv / 1e9:.1f} GB, {free / 1e9:.1f} GB free"
                    print(f"  {windows} b={batch}: {row['note']}", flush=True)
                    continue
            print(f"  {windows} {ops} b={batch} ctx={ctx}: KV {kv / 1e9:.2f} GB", flush=True)
            try:
                _time_row(row, model, opt_in, ring_layers, batch, profile, timer)
            except Exception as e:
                row["note"] = f"FAILED: {type(e).__name__}: {e}"
                print(f"    {row['note']}", flush=True)
            best = row["ms"] if row["ms"] is not None else row["eager_ms"]
            if best is not None:
                step_bytes = decode_step_bytes(cfg, batch, ctx, sssl)
                tok_s = batch / (best * 1e-3)
                if peak is not None:
                    row["pct_roofline"] = 100 * tok_s / (batch / (step_bytes / peak))
                row["pct_copy_roofline"] = 100 * tok_s / (batch / (step_bytes / (copy_gbps * 1e9)))
            if timer.cuda:
                torch.cuda.empty_cache()
    return rows


def _time_row(row: dict, model: PagedCognica, opt_in: PagedCognica, ring_layers: tuple[bool, ...], batch: int,
              profile: dict, timer: Timer) -> None:  # fmt: skip
    ctx, device = profile["ctx"], timer.device
    cache = PagedKVCache(model.cfg, ring_layers, batch, ctx, 1, model.ref.dtype, device)
    cache.fill_random()
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, model.cfg.vocab_size, (2, batch), generator=g).tolist()
    step = _step(list(range(batch)), [[t] for t in ids[0]], [ctx - 1] * batch, ids[1], device)
    if model is not opt_in:  # the same step through both paths (the step rewrites the same K/V: idempotent)
        diff = (model.forward(step, cache) - opt_in.forward(step, cache)).abs().max()
        row["logits_vs_opt_in"] = float(diff)
    row["eager_ms"], _ = timer.median_ms(lambda: model.forward(step, cache), profile["reps"], profile["warmup"])
    row["eager_tok_s"] = batch / (row["eager_ms"] * 1e-3)
    if timer.cuda:
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            model.forward(step, cache)  # warm-up off the capture stream, as torch.cuda.graphs advises
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            with torch.cuda.graph(graph):
                logits = model.forward(step, cache)
        except Exception as e:  # keep the eager numbers; the failure is reported
            row["note"] = f"FAILED: CUDA graph capture: {type(e).__name__}: {e}"
            print(f"    {row['note']}", flush=True)
            return
        graph.replay()
        timer.sync()
        assert torch.isfinite(logits).all(), "graph replay produced non-finite logits"
        row["ms"], _ = timer.median_ms(graph.replay, profile["reps"], profile["warmup"])
        row["graph"] = True
        row["tok_s"] = batch / (row["ms"] * 1e-3)
    print(f"    eager {row['eager_ms']:.3f} ms" + (f", graph {row['ms']:.3f} ms" if row["graph"] else ""), flush=True)


def _load(cfg: CognicaConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
          device: torch.device) -> CognicaGPT:  # fmt: skip
    """The reference model on `device` with the factory's weights (what `cognica.model.load_reference` does with
    the same tensors read from disk)."""
    with torch.device("meta"):
        model = CognicaGPT(cfg)
    model = model.to_empty(device=device).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True)
    return model.eval()


def run(out_path: Path, dry_run: bool, seed: int = 0) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    profile = DRY_PROFILE if dry_run else GPU_PROFILE
    timer = Timer(device)
    t0 = time.time()
    cfg = replace(PRESETS[profile["preset"]], **DRY_CONFIG) if dry_run else PRESETS[profile["preset"]]
    weights = make_weights(cfg, seed, torch.bfloat16, progress=False)
    print(f"  factory weights ({profile['preset']}, {sum(w.numel() for w in weights.values()):,} params) in "
          f"{time.time() - t0:.0f} s", flush=True)  # fmt: skip

    ref32 = _load(cfg, weights, torch.float32, device)
    parity32 = parity(PagedCognica(ref32, cfg.window_left), ref32, None, profile, device)
    ref16 = _load(cfg, weights, torch.bfloat16, device)
    parity16 = parity(PagedCognica(ref16, cfg.window_left), ref32, ref16, profile, device)
    del ref32, weights
    if timer.cuda:
        torch.cuda.empty_cache()
    copy_gbps = copy_rate_gbps(timer, profile["copy_bytes"])
    rows = time_decode(ref16, profile, timer, copy_gbps)
    name = f"{profile['preset']} factory checkpoint, {cfg.num_params:,} params, seed {seed}"
    if dry_run:
        name = f"dry-run model ({profile['preset']} preset with {DRY_CONFIG}), {cfg.num_params:,} params"
    result = {"device": device_info(device), "dry_run": dry_run, "model": name, "config": cfg.to_dict(),
              "ctx": profile["ctx"], "copy_gbps": copy_gbps, "parity_fp32": parity32, "parity_bf16": parity16,
              "rows": rows, "seconds": round(time.time() - t0, 1)}  # fmt: skip
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    failed = not parity32["ok"] or not parity16["ok"] or any(str(r["note"]).startswith("FAILED") for r in rows)
    if not dry_run and not any(r["graph"] for r in rows):
        failed = True
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="tiny preset on CPU under TRITON_INTERPRET=1")
    args = parser.parse_args()
    return run(args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
