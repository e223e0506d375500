"""Sliding-window ("SSSL") causal attention over a paged KV cache: prefill, chunked prefill and decode.

Layouts:
- `q`: `[num_tokens, num_heads, head_dim]`, the new queries of every sequence concatenated; sequence b owns rows
  `query_start_loc[b] : query_start_loc[b + 1]` (`query_start_loc` int32 `[batch + 1]`, cumulative, from 0).
- `key_cache`, `value_cache`: each `[num_blocks, block_size, num_kv_heads, head_dim]` (vLLM's flash-attn layout
  for one layer). Key position p of sequence b lives at `[block_table[b, p // block_size], p % block_size]`.
- `block_table`: int32 `[batch, max_blocks_per_seq]`. Entries for blocks the sequence cannot see are never read.
- `seq_lens`: `[batch]`, keys per sequence INCLUDING this step's new tokens, whose K/V are already in the cache.
- Output: `[num_tokens, num_heads, head_dim]`, dtype of q.

Positions and windows: query i of a sequence with q_len new tokens sits at position `seq_len - q_len + i` and sees
key s iff `t - window_left <= s <= t`. `window_left` counts the keys BEFORE the query (nanochat's and SGLang's
unit; vLLM's sliding window is `window_left + 1`); the model's S layers use 512 (so 513 keys), `None` is full
causal attention. GQA: query head h reads KV head `h // (num_heads // num_kv_heads)`. head_dim 64 or 128.

SGLang keeps one token pool `[num_slots, num_kv_heads, head_dim]` and `req_to_token[req, pos] = slot`: that is
the same layout with `block_size = 1` and the `req_to_token` rows of the batch as the block table; its adaptors
and the batched CPU decode are in `cognica_kernels.token_pool`.

The Triton kernel (one program per sequence x tile of queries x KV head x split) walks key tiles from the first
query's window start, `first_position - window_left`, to its last query, with an online softmax in fp32. Keys
outside that range are never loaded (the loads are masked), so a windowed decode step costs O(window), not
O(context). Query heads that share a KV head are packed into one tile, so GQA loads each key once per tile.
Decode can split the key range over several programs (split-K) and merge the partial softmaxes in a second kernel;
in a mixed batch the one-query sequences take the decode tile and its split-K, the others the prefill tile.
The key loop is software-pipelined (`tl.range`, `NUM_STAGES`): block-table entries two tiles ahead, K/V in two-slot
shared buffers, so the next tile's copies are in flight during the current tile's dots. Tiles and warps per
architecture: `kernel_variant`.
"""

from __future__ import annotations

import functools

import torch

from .utils import HAS_TRITON, dot_fp32, dot_precision, kv_group, next_power_of_2, tl, triton, uses_triton

_NO_WINDOW = 1 << 30  # window_left=None: larger than any context, still an int32
_DEFAULT_SMS = 132  # H100 SXM: the split-K heuristic's SM count where no CUDA device says otherwise
ALL_ROWS, DECODE_ROWS, PREFILL_ROWS = 0, 1, 2  # the kernel's ROWS: which sequences a launch serves
FA_CLASS_ROWS = 128  # tiles of this many rows (Hopper prefill) are FA-class: 64-key tiles, one program per SM


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    key_cache_ptr,
    value_cache_ptr,
    block_table_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    out_ptr,
    part_acc_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM] fp32, split-K only
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32 (running max in log2 units, sum), split-K only
    scale,
    window_left,
    num_heads,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    ROWS: tl.constexpr,  # ALL_ROWS, DECODE_ROWS (sequences with one query) or PREFILL_ROWS (the others)
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:  # the grid is sized for the longest sequence
        return
    if ROWS == 1:  # a mixed batch's decode launch: the other sequences are the prefill launch's
        if q_len != 1:
            return
    if ROWS == 2:
        if q_len == 1:
            return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len  # keys cached before this step

    # Row r of the tile is query (r // GROUP_P2) of the tile and query head (r % GROUP_P2) of this KV head.
    rows = tl.arange(0, BLOCK_M)
    q_local = q_tile * BLOCK_Q + rows // GROUP_P2
    head = kv_head * GROUP + rows % GROUP_P2
    row_valid = (rows < BLOCK_Q * GROUP_P2) & (q_local < q_len) & (rows % GROUP_P2 < GROUP)
    q_pos = ctx_len + q_local
    token = (q_start + q_local).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
    )
    if DOT_FP32:  # the interpreter's bf16 tl.dot is wrong (engines.md)
        q = q.to(tl.float32)

    # Keys this tile can see: from the first query's window start to the last query (causal).
    first_pos = ctx_len + q_tile * BLOCK_Q
    kv_lo = tl.maximum(first_pos - window_left, 0)
    kv_hi = ctx_len + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, q_len)
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(kv_hi - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = kv_lo + split * chunk
        kv_hi = tl.minimum(kv_hi, kv_lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for start in tl.range(kv_lo, kv_hi, BLOCK_N, num_stages=NUM_STAGES):
        s = start + offs_n
        s_valid = s < kv_hi  # also keeps the block-table and cache loads inside the window
        page = tl.load(block_table_ptr + seq * stride_bt + s // PAGE_SIZE, mask=s_valid, other=0).to(tl.int64)
        slot = s % PAGE_SIZE
        k = tl.load(  # [BLOCK_N, HEAD_DIM], the same layout as V: one block-table load serves both
            key_cache_ptr + page[:, None] * stride_kb + slot[:, None] * stride_ks + kv_head * stride_kh
            + offs_d[None, :],
            mask=s_valid[:, None],
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = qk * (scale * 1.4426950408889634)  # softmax in base 2: exp(x) = exp2(x * log2(e))
        visible = (
            s_valid[None, :] & (s[None, :] <= q_pos[:, None]) & (s[None, :] >= q_pos[:, None] - window_left)
        )
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            value_cache_ptr + page[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
            + offs_d[None, :],
            mask=s_valid[:, None],
            other=0.0,
        )
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32))
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(row_valid, l_i, 1.0)[:, None]  # a valid row sees at least itself: l_i > 0
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None],
        )
    else:
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr,
    part_ml_ptr,
    out_ptr,
    query_start_loc_ptr,
    num_heads,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    PER_SEQUENCE: tl.constexpr,  # one program per sequence (its one query if it has one, else nothing): mixed batches
):
    # out = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s, m = max_s m_s; empty splits have m_s = -inf.
    if PER_SEQUENCE:
        q_start = tl.load(query_start_loc_ptr + tl.program_id(0))
        if tl.load(query_start_loc_ptr + tl.program_id(0) + 1) - q_start != 1:
            return
        token = q_start.to(tl.int64)
    else:
        token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    split_valid = splits < NUM_SPLITS
    part = (token * num_heads + head) * NUM_SPLITS + splits
    m = tl.load(part_ml_ptr + part * 2, mask=split_valid, other=float("-inf"))
    l_sum = tl.load(part_ml_ptr + part * 2 + 1, mask=split_valid, other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # split 0 always holds keys, so the max is finite
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=split_valid[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_sum * w, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@functools.cache
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (132 on an H100 SXM, 114 on an H100 PCIe, 108 on an A100);
    `_DEFAULT_SMS` where there is none (CPU, the interpreter)."""
    if device_index is None or not torch.cuda.is_available():
        return _DEFAULT_SMS
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _decode_splits(batch: int, num_kv_heads: int, span: int, sms: int = _DEFAULT_SMS) -> int:
    """Split-K factor for a decode step whose longest key range is `span` keys.

    Not tuned on a GPU. A decode program holds few registers (several resident per SM), so the aim is about 4
    programs per SM, i.e. enough to fill every SM in one wave, each split keeping at least 128 keys (two 64-key
    tiles), at most 16 splits. An S layer (513 keys, 9 tiles) at batch 32 x 12 KV heads then takes 2 splits on a
    132-SM H100 (528 programs), where "2 per SM, >= 256 keys" gave none.
    """
    programs = batch * num_kv_heads
    return max(1, min(16, -(-span // 128), -(-4 * sms // max(1, programs))))


def kernel_variant(batch: int, num_heads: int, num_kv_heads: int, max_query_len: int, max_seq_len: int,
                   window_left: int | None, sms: int = _DEFAULT_SMS, arch: int | None = None) -> dict[str, int]:
    """The compile-time constants and launch options a launch picks (each distinct set is one Triton compilation).

    Under a CUDA graph the launch is recorded at capture, so these must depend only on values that are the same at
    warm-up, capture and replay: the engines pass their static maximum for `max_seq_len` (see `paged_attention`).
    `arch` is the device's compute capability as 10 * major + minor (`device_arch`; None: no CUDA device, taken as
    Hopper). Tiles are chosen by what Triton 3.6 (the GPU machines') and 3.9 (the engines') compile for sm_80 /
    sm_90 (tests/kernels_compile/test_compile.py, the "Compiled variants" table of docs/performance.md: no spills,
    >= 25 % occupancy except the FA-class tiles), not by GPU timings:

    - Every tile walks its keys in a `tl.range` loop with `NUM_STAGES` 5. Each key tile takes two dependent loads
      (block-table entries, then K/V through them); Triton's pipeliner divides the stages between the two levels,
      so 5 gives each level two buffers: the block-table entries are fetched two tiles ahead, and the next tile's
      K/V copies (cp.async) are in flight while the current tile's dots run.
    - Up to 16 rows (decode, short chunks): 4 warps, 32-key tiles (the double-buffered K/V is 32 KiB, so four
      programs fit on an A100 SM).
    - Prefill on Hopper (sm_90+) from 128 rows: an FA-class tile, 128 rows x 64 keys with 8 warps (two
      warpgroups), one program per SM (179-185 registers on Triton 3.6, 197-214 on 3.9, no spills, 128.5 KiB of
      shared memory for the two-slot K/V buffers). Gated on spills and shared memory, not occupancy: the reviewer's
      count had the 128 x 16 tile it replaces issuing 3.5-4.5x the instructions per FLOP. 3 or 4 stages would save
      shared memory but lose the two-deep pipeline (the loop then waits for every copy).
    - 32 and 64 rows on Hopper, and up to 32 rows elsewhere (sm_80): 8 warps and 16-key tiles, >= 25 % occupancy
      (on sm_80 64 rows took 160+ registers at 8 warps and 240+ at 4; 128 x 32 with 8 warps compiles without spills
      at 189-196 registers, the FA-class candidate there, not taken without a GPU timing).
    - Why 16 keys for those: with 32-key tiles Triton 3.6's ptxas needs 142 registers for 32 rows x 8 warps in
      vLLM's layout (sm_80 and sm_90) and spills 4 B in SGLang's page-1 layout on sm_80, past the 128 registers
      that two 8-warp programs per SM allow; 16-key tiles take 124-126 on 3.6 and 102-116 on 3.9.
    """
    group_p2 = next_power_of_2(num_heads // num_kv_heads)
    hopper = arch is None or arch >= 90
    block_q = min(max(1, (128 if hopper else 32) // group_p2), next_power_of_2(max_query_len))
    num_splits = 1
    if max_query_len == 1:
        span = max_seq_len if window_left is None else min(max_seq_len, window_left + 1)
        num_splits = _decode_splits(batch, num_kv_heads, span, sms)
    block_m = max(16, block_q * group_p2)  # tl.dot: >= 16 rows
    block_n = 32 if block_m <= 16 else 64 if block_m >= FA_CLASS_ROWS else 16
    return {"GROUP_P2": group_p2, "BLOCK_Q": block_q, "BLOCK_M": block_m, "NUM_SPLITS": num_splits,
            "BLOCK_N": block_n, "NUM_STAGES": 5, "num_warps": 4 if block_m <= 16 else 8}


@functools.cache
def device_arch(device_index: int | None) -> int | None:
    """Compute capability of a CUDA device as 10 * major + minor (80 on an A100, 90 on an H100); None without one."""
    if device_index is None or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def paged_attention_triton(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           scale: float, window_left: int | None, *, max_query_len: int | None = None,
                           max_seq_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Launch the paged attention kernel (see the module docstring for layouts).

    `max_query_len` / `max_seq_len` are the engines' metadata values; when None they are read from the device
    tensors (a host sync). By default decode steps split the key range (split-K), and a batch with longer
    sequences launches twice where `max_seq_len` is given: the one-query sequences on the decode tile with split-K,
    the others on the prefill tile. `num_splits` forces the split-K factor and one launch for every sequence.
    """
    assert HAS_TRITON, "paged_attention_triton needs triton"
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_head_dim = key_cache.shape
    assert value_cache.shape == key_cache.shape, f"K {tuple(key_cache.shape)} != V {tuple(value_cache.shape)}"
    assert cache_head_dim == head_dim, f"q head_dim {head_dim} != cache head_dim {cache_head_dim}"
    assert head_dim in (64, 128), f"head_dim {head_dim} not supported (64 or 128)"
    group = kv_group(num_heads, num_kv_heads)
    assert key_cache.dtype == q.dtype, f"q is {q.dtype} but the cache is {key_cache.dtype}"
    assert q.stride(-1) == 1 and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1, "head_dim not contiguous"
    batch = seq_lens.shape[0]
    assert query_start_loc.shape[0] == batch + 1, "query_start_loc must be [batch + 1]"
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if batch else 0
    out = torch.empty_like(q)
    if num_tokens == 0 or max_query_len == 0:
        return out

    if max_seq_len is None and max_query_len == 1:
        max_seq_len = int(seq_lens.max())
    device_index = q.device.index if q.is_cuda else None
    sms, arch = num_sms(device_index), device_arch(device_index)
    variant = kernel_variant(batch, num_heads, num_kv_heads, max_query_len, max_seq_len or 0, window_left, sms, arch)
    args = (q, key_cache, value_cache, block_table, seq_lens, query_start_loc, out, scale,
            window_left if window_left is not None else _NO_WINDOW, group, head_dim, page_size)
    if num_splits is None and max_query_len > 1 and max_seq_len is not None:
        # a mixed batch (vLLM passes its static max_model_len): sequences with one query take the decode tile with
        # its split-K, the others the prefill tile; each launch skips the other's rows. Without max_seq_len
        # (SGLang's extend batches) one launch: the split count would need a host sync, and Triton 3.9 spills the
        # unsplit decode tile in SGLang's page-1 layout when it skips rows (20 B on sm_90).
        decode = kernel_variant(batch, num_heads, num_kv_heads, 1, max_seq_len, window_left, sms, arch)
        _launch(*args, decode, decode["NUM_SPLITS"], DECODE_ROWS, 1)
        _launch(*args, variant, 1, PREFILL_ROWS, max_query_len)
    else:
        if num_splits is None:
            num_splits = variant["NUM_SPLITS"]
        assert num_splits >= 1, f"num_splits must be >= 1, got {num_splits}"
        _launch(*args, variant, num_splits, ALL_ROWS, max_query_len)
    return out


def _launch(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor,
            seq_lens: torch.Tensor, query_start_loc: torch.Tensor, out: torch.Tensor, scale: float, window: int,
            group: int, head_dim: int, page_size: int, variant: dict[str, int], num_splits: int, rows: int,
            max_query_len: int) -> None:
    """One launch of the attention kernel over the sequences `rows` selects, then the split-K merge if split."""
    num_tokens, num_heads, _ = q.shape
    batch, num_kv_heads = seq_lens.shape[0], key_cache.shape[2]
    if num_splits > 1:
        part_acc = torch.empty((num_tokens, num_heads, num_splits, head_dim), device=q.device, dtype=torch.float32)
        part_ml = torch.empty((num_tokens, num_heads, num_splits, 2), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out  # not touched when NUM_SPLITS == 1
    grid = (batch, triton.cdiv(max_query_len, variant["BLOCK_Q"]), num_kv_heads * num_splits)
    _paged_attention_kernel[grid](
        q, key_cache, value_cache, block_table, seq_lens, query_start_loc, out, part_acc, part_ml,
        scale, window, num_heads,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P2=variant["GROUP_P2"], HEAD_DIM=head_dim, PAGE_SIZE=page_size,
        BLOCK_Q=variant["BLOCK_Q"], BLOCK_M=variant["BLOCK_M"], BLOCK_N=variant["BLOCK_N"], NUM_SPLITS=num_splits,
        DOT_FP32=dot_fp32(q.dtype),
        DOT_PRECISION=dot_precision(q.dtype), NUM_STAGES=variant["NUM_STAGES"], ROWS=rows,
        num_warps=variant["num_warps"], num_stages=variant["NUM_STAGES"],
    )  # fmt: skip
    if num_splits > 1:
        per_sequence = rows == DECODE_ROWS  # a mixed batch: merge only the one-query sequences' tokens
        _merge_splits_kernel[(batch if per_sequence else num_tokens, num_heads)](
            part_acc, part_ml, out, query_start_loc, num_heads, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            PER_SEQUENCE=per_sequence,
        )  # fmt: skip


def paged_attention_reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              scale: float, window_left: int | None) -> torch.Tensor:
    """Plain-torch paged attention: gather each sequence's visible keys, masked softmax in fp32."""
    group = kv_group(q.shape[1], key_cache.shape[2])
    page_size = key_cache.shape[1]
    out = torch.empty_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        first = seq_len - (q1 - q0)  # position of the first new query
        if q1 == q0:
            continue
        lo = 0 if window_left is None else max(0, first - window_left)  # keys before `lo` are never gathered
        key_pos = torch.arange(lo, seq_len, device=q.device)
        pages = block_table[b, key_pos // page_size].long()
        k = key_cache[pages, key_pos % page_size].float().repeat_interleave(group, dim=1)
        v = value_cache[pages, key_pos % page_size].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", q[q0:q1].float(), k) * scale
        dist = torch.arange(first, seq_len, device=q.device)[:, None] - key_pos[None, :]  # query pos - key pos
        visible = dist >= 0
        if window_left is not None:
            visible &= dist <= window_left
        logits = logits.masked_fill(~visible, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).to(q.dtype)
    return out


def paged_attention(q: torch.Tensor, *args, max_query_len: int | None = None,
                    max_seq_len: int | None = None) -> torch.Tensor:
    """Causal (optionally windowed) paged attention: `paged_attention_triton` on CUDA, `paged_attention_reference`
    elsewhere, with their arguments (q, key_cache, value_cache, block_table, seq_lens, query_start_loc, scale,
    window_left; layouts in the module docstring).

    `max_query_len` / `max_seq_len` only spare the Triton path a host sync; the reference ignores them.
    """
    if uses_triton(q):
        return paged_attention_triton(q, *args, max_query_len=max_query_len, max_seq_len=max_seq_len)
    return paged_attention_reference(q, *args)
