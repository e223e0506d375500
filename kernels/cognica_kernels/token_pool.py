"""SGLang's token pool as `paged_attention` input, and a batched plain-torch decode attention for CPU.

SGLang keeps one token pool `[num_slots, num_kv_heads, head_dim]` per layer and `req_to_token[req, pos] = slot`:
the paged layout of `cognica_kernels.attention` with `block_size = 1` and the batch's `req_to_token` rows as the
block table. `token_pool_attention` is that adaptor (Triton on CUDA, the torch reference elsewhere);
`token_pool_decode_attention` computes decode batches on CPU in one gather instead of a loop over requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import paged_attention
from .utils import kv_group


def block_table_from_req_to_token(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor) -> torch.Tensor:
    """SGLang's `req_to_token` rows of this batch, int32 `[batch, max_context_len]`: a block table of page size 1.

    This copies `batch * max_context_len` int32 per call (the whole row, not only the used prefix).
    """
    return req_to_token.index_select(0, req_pool_indices.long()).to(torch.int32)


def token_pool_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, req_to_token: torch.Tensor,
                         req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, query_lens: torch.Tensor,
                         scale: float, window_left: int | None, *, max_query_len: int | None = None,
                         max_seq_len: int | None = None) -> torch.Tensor:
    """`paged_attention` over SGLang's token pool (`[num_slots, num_kv_heads, head_dim]`, page size 1).

    `query_lens` is `[batch]` new tokens per sequence: `extend_seq_lens` in EXTEND mode, ones in DECODE mode.
    `seq_lens` includes them, as SGLang's does. Slots are indices into the pool the K/V were written to.
    `max_query_len` / `max_seq_len`: host-side maxima (e.g. from SGLang's `extend_seq_lens_cpu`), which spare the
    Triton path a device sync per call.
    """
    block_table = block_table_from_req_to_token(req_to_token, req_pool_indices)
    query_start_loc = F.pad(torch.cumsum(query_lens, 0), (1, 0)).to(torch.int32)
    return paged_attention(
        q, k_pool.unsqueeze(1), v_pool.unsqueeze(1), block_table, seq_lens.to(torch.int32), query_start_loc,
        scale, window_left, max_query_len=max_query_len, max_seq_len=max_seq_len,
    )  # fmt: skip


def token_pool_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, window_left: int | None,
                                max_keys_per_chunk: int = 1 << 15) -> torch.Tensor:
    """Decode attention (one query per sequence) over SGLang's token pool in plain torch, batched.

    The same result as `token_pool_attention` with one query per sequence, computed for the whole batch at once:
    each sequence's last `min(seq_len, window_left + 1)` keys are gathered into a padded `[batch, span, kv_heads,
    head_dim]` block (out-of-window keys are never read), then one masked fp32 softmax. For CPU decode, where a
    loop over the sequences (the torch reference, SGLang's torch_native backend) costs more than the math.
    Sequences are taken in chunks of at most `max_keys_per_chunk` gathered keys to bound the fp32 temporaries.
    q `[batch, heads, head_dim]`, pools `[slots, kv_heads, head_dim]`, `seq_lens` including the new token.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[1]
    group = kv_group(num_heads, num_kv_heads)
    lens = seq_lens.to(torch.long)
    span = (lens if window_left is None else lens.clamp(max=window_left + 1)).clamp(min=1)  # >= 1: no NaN rows
    rows = block_table_from_req_to_token(req_to_token, req_pool_indices)
    out = torch.empty_like(q)
    start = 0
    max_span = int(span.max()) if batch else 0
    per_chunk = max(1, max_keys_per_chunk // max(1, max_span))
    while start < batch:
        end = min(batch, start + per_chunk)
        s, n = span[start:end], lens[start:end]
        width = int(s.max())
        j = torch.arange(width, device=q.device)
        valid = j[None, :] < s[:, None]  # [b, width]
        pos = torch.where(valid, (n - s)[:, None] + j[None, :], 0)  # key positions, padding reads position 0
        slots = rows[start:end].gather(1, pos.to(rows.device)).long()
        flat, shape = slots.flatten(), (end - start, width, num_kv_heads, head_dim)
        # one copy each: gathered [b, width, kv_heads, hd] -> fp32 [b, kv_heads, width, hd], contiguous
        k = k_pool.index_select(0, flat).view(shape).transpose(1, 2).to(torch.float32,
                                                                        memory_format=torch.contiguous_format)
        v = v_pool.index_select(0, flat).view(shape).transpose(1, 2).to(torch.float32,
                                                                        memory_format=torch.contiguous_format)
        qg = q[start:end].float().view(end - start, num_kv_heads, group, head_dim)
        logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [b, kv_heads, group, width]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
        y = torch.matmul(logits.softmax(-1), v)  # [b, kv_heads, group, head_dim]
        out[start:end] = y.reshape(end - start, num_heads, head_dim).to(q.dtype)
        start = end
    return out
