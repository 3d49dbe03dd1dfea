"""Trace collection: the attention rows that AttentionPredictor learns from.

For a token sequence x_1..x_T, decoding it token by token with teacher forcing gives, at every step, exactly the
queries and keys of one causal forward over the whole sequence. So one forward (no cache compression) records
every layer's post-RoPE queries (`attention.record_queries`) and the cache keeps every key; the attention row of
the last H + S positions is then recomputed per layer and query head (fp32), and pooled over key pages of 16:

    maxp  (layers, q_heads, H + S, W)  page-max-pooled rows: the predictor's input history and its MSE targets
    sums  (layers, q_heads, H + S, W)  page sums: the attention mass per page, for the recovery rate
    quest (layers, q_heads, S, W)      Quest's page bound x scaling of the S decode queries (-inf on the current
                                       and later pages), to compare with Quest offline (`training.simulate`)

W = ceil(T / 16); row r is position T - (H + S) + r and is zero on pages after it. A training example is
(rows s .. s + H - 1) -> row s + H, for s in 0..S-1: the last S positions are the "decode steps". Stored in fp16.

Sequences (`calibration_sequences`): windows of a text corpus (essays), a synthetic copy task (a passage of the
context repeated after a chat-formatted request, teacher-forced) and RULER multi-query / multi-key needle tasks
built on the corpus's sentences with their answers teacher-forced: answers that attend far back into the context.
The dense layers (0-1) are skipped.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..compat import cache_kwargs
from ..selection.base import attention_probs, page_pool

COPY_REQUEST = "Repeat, word for word, the passage of the text above that starts with \"{start}\"."


@dataclass
class Trace:
    maxp: torch.Tensor  # (L, hq, H + S, W) fp16
    sums: torch.Tensor  # (L, hq, H + S, W) fp16
    layers: list[int]
    n_tokens: int
    history: int
    kind: str = "text"
    quest: torch.Tensor | None = None  # (L, hq, S, W) fp16
    kv_heads: int = 1

    @property
    def n_steps(self) -> int:
        return self.maxp.shape[2] - self.history

    def nbytes(self) -> int:
        return self.maxp.numel() * 2 + self.sums.numel() * 2


@torch.no_grad()
def collect_trace(model, ids: list[int] | torch.Tensor, *, history: int = 64, steps: int = 64, page: int = 16,
                  dense_layers: tuple[int, ...] = (0, 1), kind: str = "text") -> Trace:
    """Run `ids` once through `model` and keep the pooled attention rows of its last `history + steps` positions."""
    from ..runtime.attention import record_queries
    from ..runtime.cache import CompressedCache

    ids = torch.as_tensor(ids).view(1, -1).to(next(model.parameters()).device)
    T = ids.shape[1]
    w = history + steps
    if T <= w:
        raise ValueError(f"a trace needs more than {w} tokens, got {T}")
    queries: dict[int, torch.Tensor] = {}
    scaling: dict[int, float] = {}

    def rec(module, query):
        queries[module.layer_idx] = query[:, :, -w:].detach()
        if getattr(module, "scaling", None) is not None:
            scaling[module.layer_idx] = float(module.scaling)

    cache = CompressedCache(model, None)
    with record_queries(rec):
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    layers = [i for i in sorted(queries) if i not in dense_layers and hasattr(cache.layers[i], "positions")]
    q_pos = torch.arange(T - w, T, device=ids.device)
    from ..selection.quest import page_minmax, page_scores

    maxp, sums, quest = [], [], []
    n_full = T // page
    for i in layers:
        layer = cache.layers[i]
        q = queries[i]
        p = attention_probs(q, layer.keys, scaling.get(i, q.shape[-1] ** -0.5),
                            getattr(model.config.get_text_config(), "attn_logit_softcapping", None))[0]  # (hq, w, T)
        p = p.masked_fill(torch.arange(T, device=p.device)[None, None, :] > q_pos[None, :, None], 0.0)
        p = p / p.sum(-1, keepdim=True)
        maxp.append(page_pool(p, page, "max").half().cpu())
        sums.append(page_pool(p, page, "sum").half().cpu())
        kmin, kmax = page_minmax(layer.keys[:, :, : n_full * page], page)
        pad = (0, 0, 0, math.ceil(T / page) - n_full)
        kmin, kmax = torch.nn.functional.pad(kmin, pad), torch.nn.functional.pad(kmax, pad)
        hq = q.shape[1]
        qs = q[0, :, -steps:].transpose(0, 1).reshape(1, steps * hq, -1)  # step-major: (1, S * hq, d)
        u = page_scores(qs, kmin.repeat(1, steps, 1, 1), kmax.repeat(1, steps, 1, 1))  # (1, S * hq, P)
        u = u.view(steps, hq, -1).transpose(0, 1) * scaling.get(i, q.shape[-1] ** -0.5)  # (hq, S, P)
        cur = (q_pos[-steps:] // page)[None, :, None]
        u = u.masked_fill(torch.arange(u.shape[-1], device=u.device)[None, None, :] >= cur, float("-inf"))
        quest.append(u.half().cpu())
    return Trace(torch.stack(maxp), torch.stack(sums), layers, T, history, kind, torch.stack(quest),
                 cache.layers[layers[0]].keys.shape[1] if layers else 1)


def _split_stream(tokenizer, texts: list[str], val_share: float) -> tuple[list[int], list[int]]:
    """Token stream of the texts, split by text (not by window) into a train and a validation part."""
    texts = [t for t in texts if t.strip()]
    n_val = max(1, round(len(texts) * val_share)) if len(texts) > 1 else 0
    enc = lambda ts: tokenizer("\n\n".join(ts), add_special_tokens=False).input_ids  # noqa: E731
    if n_val == 0:  # one text: its last part validates
        ids = enc(texts)
        cut = int(len(ids) * (1 - val_share))
        return ids[:cut], ids[cut:]
    return enc(texts[:-n_val]), enc(texts[-n_val:])


def _window(stream: list[int], length: int, rng: random.Random) -> list[int]:
    if len(stream) <= length:  # short corpus: wrap around
        reps = length // max(1, len(stream)) + 2
        stream = stream * reps
    s = rng.randrange(0, len(stream) - length)
    return stream[s : s + length]


def copy_sequence(tokenizer, stream: list[int], length: int, answer_tokens: int, rng: random.Random) -> list[int]:
    """A chat-formatted request to repeat a passage of the context, followed by the passage (teacher forcing)."""
    from ..runtime.generate import split_prompt

    ctx_len = length - answer_tokens - 48
    window = _window(stream, ctx_len, rng)
    at = rng.randrange(0, max(1, ctx_len - answer_tokens - 8))
    passage = window[at : at + answer_tokens]
    start = tokenizer.decode(passage[:8]).strip().replace('"', "'")
    context = tokenizer.decode(window)
    ctx, q = split_prompt(tokenizer, context, COPY_REQUEST.format(start=start))
    return ctx + q + passage


class _TextHaystack:
    """A haystack (kvsqueeze.tasks.haystack protocol) over the sentences of a token stream's text."""

    def __init__(self, tokenizer, stream: list[int]):
        import re

        text = re.sub(r"\s+", " ", tokenizer.decode(stream[:200_000]))
        self.units = [u for u in re.split(r"(?<=[.!?])\s+", text) if u] or [text]
        self.tag = "calibration"

    def sentences(self, n: int, rng: random.Random) -> list[str]:
        start = rng.randrange(len(self.units))
        return [self.units[(start + i) % len(self.units)] for i in range(n)]


def retrieval_sequence(tokenizer, stream: list[int], length: int, rng: random.Random) -> list[int]:
    """A RULER multi-query / multi-key needle task in the text, then its answer as a numbered list (teacher
    forcing): decoding steps that jump back to the needles."""
    from ..runtime.generate import split_prompt
    from ..tasks import ruler

    fn = rng.choice([ruler.niah_multiquery, ruler.niah_multikey])
    smp = fn(tokenizer, 1, length, seed=rng.randrange(10**6), haystack=_TextHaystack(tokenizer, stream))[0]
    ctx, q = split_prompt(tokenizer, smp.context, smp.question, smp.answer_prefix)
    answer = ":\n\n" + "\n".join(f"{i + 1}. {v}" for i, v in enumerate(smp.answers)) + "\n"
    return ctx + q + tokenizer(answer, add_special_tokens=False).input_ids


def calibration_sequences(tokenizer, texts: list[str], n_seq: int, seq_len: int, *, copy_share: float = 0.3,
                          retrieval_share: float = 0.3, steps: int = 64, val_share: float = 0.2, seed: int = 0
                          ) -> tuple[list[tuple[str, list[int]]], list[tuple[str, list[int]]]]:
    """(train, val) lists of (kind, token ids) of seq_len / 2 .. seq_len tokens: text windows, copy-task and
    needle-retrieval sequences; validation sequences come from texts no training sequence uses."""
    rng = random.Random(f"predictor-{seed}")
    train_stream, val_stream = _split_stream(tokenizer, texts, val_share)
    n_val = max(1, round(n_seq * val_share))
    out = []
    for i in range(n_seq):
        stream = val_stream if i >= n_seq - n_val else train_stream
        length = rng.randint(seq_len // 2, seq_len)
        u = rng.random()
        if u < copy_share:
            out.append(("copy", copy_sequence(tokenizer, stream, length, steps + 16, rng)))
        elif u < copy_share + retrieval_share:
            out.append(("retrieval", retrieval_sequence(tokenizer, stream, length, rng)))
        else:
            out.append(("text", _window(stream, length, rng)))
    return out[: n_seq - n_val], out[n_seq - n_val :]
