"""Attention probabilities recomputed from queries and stored keys: the one softmax(q K^T) of the package.

Every score that needs attention weights (H2O, SnapKV, TOVA, PyramidKV through `ScoreInputs.attention`; their sum
over queries, `attention_sum`, runs `kernels/attention_sum.py`'s two passes on CUDA instead of the chunks,
ZipCache's probe rows, the selectors' recovery rate and AttentionPredictor's history, the predictor's training
traces) calls `attention_chunks` (or `attention_probs`, all queries at once). The rule is the model's own eager
attention (transformers' `eager_attention_forward`), in fp32:

    logits = scaling * q K^T                        (then softcap * tanh(logits / softcap) when softcap is set:
                                                     Gemma 2's attention logit soft-capping)
    p      = softmax(logits over the visible keys)  (a key is visible iff k_pos <= q_pos, and k_pos > q_pos -
                                                     window on a sliding layer, and its slot is valid)

Grouped-query attention: the g = q_heads / kv_heads query heads of a group share their kv head; the queries are
reshaped to (b, kv_heads, g * q, d) so keys are never repeated in memory. A query row with no visible key (a
padding query) is all zeros, not NaN: it contributes nothing to sums, as when its row runs alone.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import torch

from .attention_sum import attention_shapes, attention_sum_kernel, kernel_applies

CHUNK_ELEMENTS = 1 << 26  # logits per chunk (fp32: 256 MiB) when no chunk size is given


class AttentionChunk(NamedTuple):
    """One chunk of queries: `start` (index of its first query), `probs` (batch, q_heads, c, n) fp32, and
    `allowed` (batch, kv_heads, 1, c, n) bool, the keys each query of the chunk may see (None when nothing is
    masked: no positions and no `valid`). `allowed.sum(...)` gives the counts of visible keys (ZipCache)."""

    start: int
    probs: torch.Tensor
    allowed: torch.Tensor | None


def default_chunk(batch: int, q_heads: int, n: int) -> int:
    """Queries per chunk so that one chunk's logits hold about `CHUNK_ELEMENTS` values."""
    return max(1, CHUNK_ELEMENTS // max(1, batch * q_heads * n))


def attention_chunks(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, softcap: float | None = None,
                     q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                     valid: torch.Tensor | None = None, window: int | None = None,
                     chunk: int | None = None) -> Iterator[AttentionChunk]:
    """Yield the softmax attention of `queries` (batch, q_heads, q, head_dim) over `keys` (batch, kv_heads, n,
    head_dim), `chunk` queries at a time (default: `default_chunk`), never a full q x n matrix at once.

    - `scaling`: the logits' factor (the model's `module.scaling`, usually head_dim ** -0.5);
    - `softcap`: Gemma 2's logit soft-capping (None or 0: none);
    - `q_positions` (q,) or (batch, q) and `k_positions` (batch, kv_heads, n), integers in one frame: causal by
      position, a key is visible iff k_pos <= q_pos (and k_pos > q_pos - `window` when `window` is set). Both
      or neither; without them every key is in the past of every query;
    - `valid` (batch, kv_heads, n) bool: slots that hold a token (padding, unused slots are False).

    Raises ValueError when only one of the positions is given or q_heads is not a multiple of kv_heads.
    Source: transformers' eager attention (scaling, softcap, mask, fp32 softmax); GQA grouping as in sdpa's
    `enable_gqa`."""
    b, hq, w, d, hk, n = attention_shapes("attention_chunks", queries, keys, q_positions, k_positions)
    g = hq // hk
    k = keys.float()
    if chunk is None:
        chunk = default_chunk(b, hq, n)
    for s in range(0, w, chunk):
        qc = queries[:, :, s : s + chunk].float()
        c = qc.shape[2]
        logits = torch.matmul(qc.reshape(b, hk, g * c, d), k.transpose(-1, -2)).view(b, hk, g, c, n)
        logits = logits * scaling
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = None
        if q_positions is not None:
            qp = q_positions[..., s : s + c]
            qp = qp.reshape(qp.shape[0] if qp.dim() == 2 else 1, 1, 1, c, 1)
            kp = k_positions[:, :, None, None, :]
            allowed = kp <= qp
            if window:
                allowed = allowed & (kp > qp - window)
        if valid is not None:
            v = valid[:, :, None, None, :]
            allowed = v if allowed is None else allowed & v
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        # a query with no visible key (padding) gets a NaN row from softmax: zeros, it contributes nothing
        yield AttentionChunk(s, torch.softmax(logits, dim=-1).nan_to_num_(0.0).view(b, hq, c, n), allowed)


def attention_sum(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, softcap: float | None = None,
                  q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None, window: int | None = None,
                  chunk: int | None = None) -> torch.Tensor:
    """(batch, q_heads, n) fp32: the attention of `attention_chunks` (same arguments) summed over the queries. With
    `attention_sum.KERNEL` set (the default), on CUDA and without softcap, the two-pass Triton
    kernel of `kernels/attention_sum.py`, which never holds the q x n probabilities in memory; otherwise the
    chunks' sums. Equal up to float32 summation order."""
    if kernel_applies(queries, keys, softcap):
        return attention_sum_kernel(queries, keys, scaling=scaling, q_positions=q_positions,
                                    k_positions=k_positions, valid=valid, window=window)
    total = None
    for c in attention_chunks(queries, keys, scaling=scaling, softcap=softcap, q_positions=q_positions,
                              k_positions=k_positions, valid=valid, window=window, chunk=chunk):
        s = c.probs.sum(2)
        total = s if total is None else total + s
    return total


def attention_probs(queries: torch.Tensor, keys: torch.Tensor, *, scaling: float, softcap: float | None = None,
                    q_positions: torch.Tensor | None = None, k_positions: torch.Tensor | None = None,
                    valid: torch.Tensor | None = None, window: int | None = None,
                    chunk: int | None = None) -> torch.Tensor:
    """(batch, q_heads, q, n) fp32: every chunk of `attention_chunks` (same arguments) concatenated; with `chunk`
    None, all queries in one chunk. For sums over queries, iterate `attention_chunks` instead (no q x n tensor)."""
    parts = [c.probs for c in attention_chunks(queries, keys, scaling=scaling, softcap=softcap,
                                               q_positions=q_positions, k_positions=k_positions, valid=valid,
                                               window=window, chunk=chunk or max(1, queries.shape[2]))]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
