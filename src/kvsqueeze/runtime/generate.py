"""Prefill a context into a compressed cache, then answer a question from it.

Question-agnostic by default (kvpress's protocol): the context is prefilled and compressed without the question,
then the question and the answer are decoded on top of the compressed cache, so one compressed context can serve
many questions. `query_aware=True` compresses context and question together.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..compat import cache_kwargs
from ..devices import input_device
from ..errors import KVSqueezeError
from ..methods import Method
from ..storage.stats import CacheStats
from .cache import CompressedCache

SEPARATOR = "\x00KVSQUEEZE_SPLIT\x00"


def split_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> tuple[list[int], list[int]]:
    """Token ids of (context part, question part) of the chat-formatted prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": context + SEPARATOR}], add_generation_prompt=True, tokenize=False
        )
        head, tail = text.split(SEPARATOR)
        head_text, question_text = head, "\n\n" + question + tail + answer_prefix
    else:
        head_text, question_text = context, "\n\n" + question + "\nAnswer: " + answer_prefix
    ctx = tokenizer(head_text, add_special_tokens=False).input_ids
    if getattr(tokenizer, "bos_token_id", None) is not None and not getattr(tokenizer, "chat_template", None):
        ctx = [tokenizer.bos_token_id] + ctx
    q = tokenizer(question_text, add_special_tokens=False).input_ids
    return ctx, q


def _device(model):
    """Where the prompt's ids go: the input embeddings' device (`devices.input_device`: the first device of a
    model split by `device_map`)."""
    return input_device(model)


@torch.no_grad()
def prefill(model, cache: CompressedCache, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Run `ids` (batch, T) through the model into `cache`, compressing after every chunk; return last logits.

    With `chunk_size`, peak KV memory is bounded by the budget plus one chunk.
    """
    chunk_size = chunk_size or ids.shape[1]
    logits = None
    with cache.prefill():
        for s in range(0, ids.shape[1], chunk_size):
            out = model(input_ids=ids[:, s : s + chunk_size], **cache_kwargs(model, cache), use_cache=True,
                        logits_to_keep=1)
            logits = out.logits[:, -1]
    return logits


@dataclass
class PrefillRecord:
    """One uncompressed prefill, with what every prefill-time method needs to score it."""

    cache: CompressedCache
    queries: dict[int, torch.Tensor]  # layer -> (batch, q_heads, T, head_dim) post-RoPE
    scaling: dict[int, float]
    n_tokens: int
    memo: dict = field(default_factory=dict)  # attention sums shared across the methods scored on this record

    def compress(self, model, method: Method | None, layer_factory=None) -> CompressedCache:
        """A compressed cache equal to prefilling with `method` (single-chunk prefill) into layers built by
        `layer_factory` (default: the record's; a quantized scheme's factory for quantized storage), without
        re-running the prefill."""
        return self.cache.compressed_copy(model, method, self.queries, self.scaling, self.memo, layer_factory)


@torch.no_grad()
def record_prefill(model, ids: torch.Tensor) -> PrefillRecord:
    """Prefill `ids` once with no compression, keeping every layer's post-RoPE queries."""
    from .attention import record_queries

    queries: dict[int, torch.Tensor] = {}
    scaling: dict[int, float] = {}

    def rec(module, query):
        queries[module.layer_idx] = query
        if getattr(module, "scaling", None) is not None:
            scaling[module.layer_idx] = module.scaling

    cache = CompressedCache(model, None)
    with record_queries(rec):
        prefill(model, cache, ids)
    return PrefillRecord(cache, queries, scaling, ids.shape[1])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return ids


@torch.no_grad()
def decode_step(model, cache, tokens: torch.Tensor) -> torch.Tensor:
    """One decoding forward: feed `tokens` (batch,) long, one per row, on top of `cache`; return the next-token
    logits (batch, vocab) in the model's dtype. Every token-at-a-time loop (greedy decoding, the perplexity task's
    teacher-forced feed) steps through here."""
    return model(input_ids=tokens[:, None], **cache_kwargs(model, cache), use_cache=True).logits[:, -1]


@torch.no_grad()
def greedy_decode_batch(model, cache, first_logits: torch.Tensor, max_new_tokens: int,
                        eos: set[int]) -> list[list[int]]:
    """Greedy decoding of every row from `first_logits` (batch, vocab) on top of `cache` (batch rows): the one
    greedy loop of kvsqueeze. Row r takes the argmax token, stops before an `eos` token (not included) or once it
    holds `max_new_tokens` tokens; one forward per step feeds every row (a finished row's argmax is fed too and
    ignored, so the rows still running see exactly their own history; on a `CompressedCache` the finished rows
    are its `idle_rows` meanwhile, whose attention a stacked batch skips). Returns each row's tokens."""
    b = first_logits.shape[0]
    outs: list[list[int]] = [[] for _ in range(b)]
    live = [True] * b
    token = first_logits.argmax(-1)
    tracks = isinstance(cache, CompressedCache)
    try:
        while True:
            for r, t in enumerate(token.tolist()):
                if not live[r]:
                    continue
                if t in eos:
                    live[r] = False
                    continue
                outs[r].append(t)
                if len(outs[r]) >= max_new_tokens:
                    live[r] = False
            if not any(live):
                return outs
            if tracks:
                cache.idle_rows = frozenset(r for r in range(b) if not live[r])
            token = decode_step(model, cache, token).argmax(-1)
    finally:
        if tracks:
            cache.idle_rows = frozenset()


@torch.no_grad()
def answer_tokens(model, cache, question: torch.Tensor, max_new_tokens: int, eos: set[int], static: bool = False,
                  compile: bool = False, static_out: list | None = None,
                  page_frames: bool | float = True, prefetch: bool = False) -> list[list[int]]:
    """Append `question` (batch, q) token ids to `cache` (uncompressed unless the method compresses appends),
    then decode every row greedily (`greedy_decode_batch`). Returns each row's answer tokens.

    `static=True` decodes over a fixed-capacity copy of the cache instead (`runtime/static.py`: the same tokens,
    no Python or allocation per step beyond the step call), `compile=True` with the step compiled
    (`torch.compile`, CUDA graphs on a GPU; implies `static`). Raises KVSqueezeError for a cache the static path
    cannot hold (quantized storage other than KIVI, a selector other than Quest and AttentionPredictor,
    attention-based decode-time eviction). An offloaded cache (`offload="cpu"`) stays offloaded in the static
    copy (its sparse layers in host memory, the step's pages in device frames: `StaticCompressedCache.from_cache`).
    `static_out`: a list the static copy is appended to (for its `offload_stats()`). `page_frames`: the static
    copy's device page frames of an offloaded cache (`from_cache`'s: True = the pages per step, a ratio r >= 1 = r
    times as many, False = none, pages read in place); `prefetch`: AttentionPredictor's next pages copied during
    each step (`from_cache(prefetch=True)`)."""
    logits = model(input_ids=question, **cache_kwargs(model, cache), logits_to_keep=1).logits[:, -1]
    if static or compile:
        from .static import StaticCompressedCache, static_greedy_decode

        st = StaticCompressedCache.from_cache(cache, max_new_tokens, page_frames=page_frames, prefetch=prefetch)
        if static_out is not None:
            static_out.append(st)
        return static_greedy_decode(model, st, logits, max_new_tokens, eos, compile=compile)
    return greedy_decode_batch(model, cache, logits, max_new_tokens, eos)


def greedy_decode(model, cache, first_logits: torch.Tensor, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy decoding from `first_logits` (1, vocab) on top of `cache`: `greedy_decode_batch` of one row.
    Raises KVSqueezeError for more than one row."""
    if first_logits.shape[0] != 1:
        raise KVSqueezeError(f"greedy_decode decodes one row, got {first_logits.shape[0]}: use greedy_decode_batch")
    return greedy_decode_batch(model, cache, first_logits, max_new_tokens, eos)[0]


@dataclass
class GenerationResult:
    answer: str
    stats: CacheStats
    seconds: float
    n_context_tokens: int
    n_question_tokens: int
    offload: dict | None = None  # CompressedCache.offload_stats() after the answer, when offloaded
    decode_stats: CacheStats | None = None  # the static copy's bytes (static / compile), frames included


def check_budget(method: Method | None, n_context: int) -> None:
    """Refuse an empty context, and an absolute budget that would compress nothing: one not below the context
    when the method compresses only the prefill (with `compression_interval` the cache grows to the budget while decoding,
    so a larger budget is meaningful). Raises KVSqueezeError."""
    if n_context == 0:
        raise KVSqueezeError("the context is empty")
    if (method is not None and method.budget is not None and method.budget >= n_context
            and not getattr(method, "compression_interval", 0)):
        raise KVSqueezeError(f"budget of {method.budget} tokens is not smaller than the context ({n_context} tokens)")


@torch.no_grad()
def generate_answer(model, tokenizer, context: str, question: str, method: Method | None = None,
                    max_new_tokens: int = 32, chunk_size: int | None = None, query_aware: bool = False,
                    answer_prefix: str = "", layer_factory=None, selector=None, static: bool = False,
                    compile: bool = False, offload: str | None = None,
                    page_frames: bool | float = True, offload_cpu_cache: int | None = None,
                    prefetch: bool = False) -> GenerationResult:
    """Compress `context` with `method`, then answer `question` greedily. `layer_factory` sets how the kept
    slots are stored (e.g. `kvsqueeze.quant.kivi(2)`: 2-bit KIVI; None: full precision); `selector` (e.g.
    `kvsqueeze.selection.Quest(512)`) makes every decoding step attend to a subset of what is stored.
    `static` / `compile`: decode over a fixed-capacity copy of the compressed cache, the step compiled with
    `compile` (see `answer_tokens`; the stats are the eager cache's, before the copy). `offload` ('cpu', with a
    `selector`): the sparse layers' KV in host memory, pages copied per step (`kvsqueeze.storage.offload`; with a
    KIVI `layer_factory`, KIVI's packed storage on the host, `kvsqueeze.quant.offload`; with
    `static`, the static copy's device frames, `storage/frames.py`); the result then carries `offload`
    (`CompressedCache.offload_stats()`, or the static copy's `offload_stats()`). `page_frames`: with `static` and
    `offload`, the device page frames per offloaded layer as a ratio r >= 1 of the pages a step reads (more frames
    keep more of the earlier steps' pages: fewer cross the link; `answer_tokens`). `offload_cpu_cache`: with
    `offload="disk"`, the CPU cache's pages per offloaded layer (`CompressedCache`'s; None: 4x the frames, 0: none).
    `prefetch`: with `static`, `offload="cpu"` and an AttentionPredictor `selector`, each layer's next pages are
    copied during the step (`answer_tokens`). Raises KVSqueezeError for an
    empty context, a budget not below it, or what the static path refuses."""
    if not context.strip():
        raise KVSqueezeError("the context is empty")
    ctx, q = split_prompt(tokenizer, context, question, answer_prefix)
    if query_aware:
        ctx, q = ctx + q[:-1], q[-1:]
    check_budget(method, len(ctx))
    if static or compile:
        from .static import check_model

        check_model(model)  # before the prefill, not after it
    device = _device(model)
    t0 = time.perf_counter()
    cache = CompressedCache(model, method, layer_factory=layer_factory, selector=selector, offload=offload,
                            offload_cpu_cache=offload_cpu_cache)
    prefill(model, cache, torch.tensor([ctx], device=device), chunk_size)
    stats = cache.stats()  # the compressed context, before the question is appended
    copies: list = []
    tokens = answer_tokens(model, cache, torch.tensor([q], device=device), max_new_tokens,
                           _eos_ids(model, tokenizer), static=static, compile=compile, static_out=copies,
                           page_frames=page_frames, prefetch=prefetch)[0]
    seconds = time.perf_counter() - t0
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    off = None
    if cache.offload_tier:
        off = copies[0].offload_stats() if copies else cache.offload_stats()
    return GenerationResult(answer, stats, seconds, len(ctx), len(q), off, copies[0].stats() if copies else None)
