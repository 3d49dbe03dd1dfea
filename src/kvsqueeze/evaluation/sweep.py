"""The sweep engine: methods x compression_ratios x tasks x samples, one prefill per sample, rows stored as they finish.

Compressing the cache after each layer's prefill attention does not change the prefill's hidden states, so one
uncompressed prefill per sample (`record_prefill`, which keeps every layer's post-RoPE queries) serves every
prefill-time method and compression_ratio: `PrefillRecord.compress` rebuilds exactly the cache that prefilling with that
method would have produced, and only the scoring, the question and the short answer decode repeat per pair.

Protocols (the `protocol` column of each row):

- `shared-prefill`: question-agnostic QA (kvpress's protocol): the context is compressed from the shared record,
  then the question is fed uncompressed on top and the answer decoded greedily; with `query_aware=True` the
  record covers context + question (all but its last token), as `generate_answer(query_aware=True)` does;
- `re-prefill`: methods that are not prefill-only (`compression_interval > 0`, which keep compressing while decoding)
  and chunked prefills (`chunk_size`) fall back to `generate_answer`, one full prefill per pair; so does
  `share_prefill=False` (the reference the benchmark compares with);
- `capped-ppl` / `capped-ppl-re-prefill`: perplexity with a capped cache (see `tasks/perplexity.py`): the prefix
  is compressed to the method's budget from the shared record (or prefilled again), then the scored tokens are
  fed one at a time with `compression_interval=1`. The record-based start is the same cache object state as a real
  prefill (tested: identical NLL), because the decode-time compression only starts after it.

Storage and selection (`quants=`, `selects=` of `make_pairs`; `--quant`, `--select` on the CLI): a quantized
configuration is compressed from the same record into the scheme's layers (`PrefillRecord.compress(...,
layer_factory)`), a selected one gets its selector with the record's prefill replayed to `selector.observe`; both
are answered from their own cache, never merged into a batch (tested: the answers of a fresh prefill). Rows also
record `quant`, `select`, `select_budget` and the 16-bit-normalised bytes (`sizes.py`).

Resumable: rows are keyed (model, method, params, compression_ratio, task, sample, seed, code version); keys already
in the store are skipped, and each new row is committed as soon as it is computed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from ..runtime.cache import CompressedCache
from ..runtime.calibration import prepare
from ..errors import KVSqueezeError
from ..methods import Method, for_storage, get_method
from ..runtime.generate import (_eos_ids, answer_tokens, check_budget, decode_step, generate_answer, prefill,
                                record_prefill, split_prompt)
from ..tasks.base import Sample, score
from .sizes import bytes_16
from .store import ResultStore, code_version as default_code_version


# --- method identity ---------------------------------------------------------------------------------------
def method_params(m: Method) -> dict:
    """A method's parameters as JSON-able values, `compression_ratio` excluded (it is a key column of its own).

    A nested method (PyramidKV's scorer) becomes {"name": ..., params...}; a tensor (Q-Filters' filters) becomes
    a content hash, so results with different filters never share a key."""
    out = {"name": m.name}
    for f in dataclasses.fields(m):
        if f.name == "compression_ratio":
            continue
        v = getattr(m, f.name)
        if isinstance(v, Method):
            v = {**method_params(v), "compression_ratio": v.compression_ratio}
        elif isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous().float()
            v = "tensor:" + hashlib.sha256(t.numpy().tobytes()).hexdigest()[:12]
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def is_prefill_only(m: Method) -> bool:
    """True when the method only compresses at the prefill (then one shared prefill serves it)."""
    if m.compression_interval > 0:
        return False
    scorer = getattr(m, "scorer", None)
    return not (isinstance(scorer, Method) and scorer.compression_interval > 0)


@dataclass
class Pair:
    """One configuration of a grid: (method, compression_ratio), optionally with quantized storage and a decode-time
    selector.

    `method` is what the cache runs (for MiKV / ZipCache storage, the method composed with the scheme by
    `kvsqueeze.methods.for_storage`); `base` the method as given (the capped-perplexity task caps it before wrapping).
    The key of a row is (`name`, `params_json`, `compression_ratio`): `params_json` holds the quant scheme, selector
    and budget only when they are set, so plain configurations keep the keys they always had."""

    method: Method
    compression_ratio: float  # the key's nominal compression_ratio: -1 for an absolute budget, 0 for `full`
    params_json: str
    query_aware: bool = False
    quant: str | None = None  # --quant scheme name (None: full-precision storage)
    qspec: object = None  # its QuantSpec (layer_factory, importance rule)
    select: str | None = None  # decode-time selector name (None: dense)
    select_budget: int | None = None
    selector: object = None  # the Selector instance (reset before each cache it serves)
    offload: str | None = None  # 'cpu' / 'disk': the selected layers' KV off the device, pages moved per step
    base: Method | None = None
    method_name: str | None = None  # the key's method column (default: method.name)

    @property
    def name(self) -> str:
        return self.method_name or self.method.name

    @property
    def layer_factory(self):
        return self.qspec.layer_factory if self.qspec is not None else None

    @property
    def exact_alone(self) -> bool:
        """Answered from its own cache, not merged into a batch: quantized storage quantizes the question and
        answer tokens as they arrive, and a selector keeps per-sequence state; a merged plain cache would do
        neither."""
        return self.qspec is not None or self.selector is not None

    def cache(self, cache):
        """`cache` (built for this pair) offloaded when the pair says so (`CompressedCache.offload_to`)."""
        return cache.offload_to(self.offload) if self.offload else cache

    def run_method(self, m: Method) -> Method:
        """`m` as the cache runs it with this pair's storage (`kvsqueeze.methods.for_storage`: MiKV wraps it;
        ZipCache storage takes its scores for the high-precision tokens)."""
        return for_storage(m, self.qspec)

    def label(self) -> str:
        out = self.method.describe()
        if self.quant:
            out += f" + {self.quant}"
        if self.select:
            out += f" + {self.select}@{self.select_budget}"
        if self.offload:
            out += f" offloaded to {self.offload}"
        return out


def _selects(selects) -> list[tuple[str | None, int | None]]:
    if not selects:
        return [(None, None)]
    out = []
    for x in selects:
        name, budget = (x, None) if isinstance(x, str) or x is None else x
        if name is None or str(name).lower() in ("", "none"):
            out.append((None, None))
        else:
            out.append((str(name).lower().replace("-", "_"), int(budget) if budget is not None else 512))
    return list(dict.fromkeys(out))


def make_pairs(methods: list[Method | str], compression_ratios: list[float], query_aware: bool = False,
               quants: list[str | None] | None = None, selects: list | None = None, offload: str | None = None,
               skipped: list[str] | None = None, **method_kwargs) -> list[Pair]:
    """The grid methods x compression_ratios x quants x selects. `full` runs once (compression_ratio 0); a method with
    a `budget` runs once (compression_ratio -1). `quants`: --quant scheme names ("none" / None: full precision);
    `selects`: (selector name, budget) pairs (("none", _) or None: dense attention). A configuration that comes out
    identical to an earlier one runs once. A method and a scheme that do not compose (`for_storage` refuses: a
    merging method with MiKV / ZipCache, a cross-layer method with any scheme) raise its `KVSqueezeError`, or, when
    `skipped` is a list, are left out of the grid and named there ("d2o + mikv-8-2"). `offload` ('cpu' or 'disk'):
    every pair offloaded (its params say so); needs a selector in every pair, and full-precision or KIVI storage
    (KIVI's packed storage is the host tier, `kvsqueeze.quant.offload`) (KVSqueezeError otherwise)."""
    from ..quant import parse_quant

    qspecs = [parse_quant(q) for q in (quants or [None])]
    sels = _selects(selects)
    offload = None if offload in (None, "none") else offload
    if offload is not None:
        if offload not in ("cpu", "disk"):
            raise KVSqueezeError(f"--offload must be cpu, disk or none, got {offload!r}")
        if any(n is None for n, _ in sels):
            raise KVSqueezeError("--offload needs --select (quest, attention_predictor or leoam) for every "
                                 "configuration: "
                                 "without a selector every step attends to every token (drop 'none' from --select)")
        from ..quant.offload import host_tier_for_layers

        for q in qspecs:  # KIVI's packed storage has a host tier; other schemes are refused (KVSqueezeError)
            host_tier_for_layers(q.layer_factory if q is not None else None)
    if any(n is not None for n, _ in sels):
        from ..selection import get_selector
    pairs: list[Pair] = []
    seen: set[tuple] = set()
    for spec in methods:
        for r in compression_ratios:
            if isinstance(spec, Method):
                m = dataclasses.replace(spec, compression_ratio=r) if spec.budget is None else spec
            else:
                m = get_method(spec, compression_ratio=r, **method_kwargs)
            if m.name == "full":
                m = dataclasses.replace(m, compression_ratio=0.0, budget=None)
            key_ratio = 0.0 if m.name == "full" else (-1.0 if m.budget is not None else float(r))
            for qs in qspecs:
                try:
                    run = for_storage(m, qs)
                except KVSqueezeError:
                    if skipped is None:
                        raise
                    if f"{m.name} + {qs.name}" not in skipped:
                        skipped.append(f"{m.name} + {qs.name}")
                    continue
                # the method column: the given method, unless the scheme runs its own rule (ZipCache over `full`)
                name = m.name if (run is m or getattr(run, "inner", None) is m) else run.name
                for sel, budget in sels:
                    params = method_params(run)
                    if query_aware:
                        params["protocol"] = "query-aware"
                    if qs is not None:
                        params["quant"] = qs.name
                    if sel is not None:
                        params["select"], params["select_budget"] = sel, budget
                    if offload is not None:
                        if (not is_prefill_only(run) or getattr(run, "stateful", False)
                                or hasattr(run, "cross_layer_plan")):
                            raise KVSqueezeError(f"--offload keeps the KV off the device between prefills: "
                                                 f"{run.describe()} scores or evicts while decoding (drop it from "
                                                 "the grid, or --offload)")
                        params["offload"] = offload
                    pj = json.dumps(params, sort_keys=True)
                    if (name, pj, key_ratio) in seen:
                        continue
                    seen.add((name, pj, key_ratio))
                    selector = get_selector(sel, budget) if sel is not None else None
                    pairs.append(Pair(run, key_ratio, pj, query_aware, quant=qs.name if qs else None, qspec=qs,
                                      select=sel, select_budget=budget, selector=selector, base=m,
                                      method_name=name, offload=offload))
    return pairs


# --- one pair on one sample ----------------------------------------------------------------------------------
def _device(model):
    from ..devices import input_device

    return input_device(model)  # the input embeddings' device (a model split by device_map: its first)


@torch.no_grad()
def kept_digest(cache) -> str:
    """A 12-hex-digit digest of which slots every layer of `cache` holds: each slot's position (-1 where it is
    hidden, e.g. padding) in the layer's slot order, layer after layer. Two caches holding the same tokens in the
    same order have the same digest (rows of two code versions are compared on it: `meta_json.kept_digest`)."""
    import hashlib

    h = hashlib.sha1()
    for layer in cache.layers:
        pos = getattr(layer, "positions", None)
        if pos is None:
            h.update(b"|")
            continue
        pos = pos.long()
        valid = getattr(layer, "valid", None)
        if valid is not None:
            pos = pos.masked_fill(~valid, -1)
        h.update(pos.cpu().numpy().tobytes())
        h.update(b"|")
    return h.hexdigest()[:12]


def _answer_from_cache(model, tokenizer, cache, q_ids, max_new_tokens, eos):
    tokens = answer_tokens(model, cache, torch.tensor([q_ids], device=_device(model)), max_new_tokens, eos)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def merge_caches(model, caches: list[CompressedCache], room: int = 0) -> CompressedCache:
    """One batch cache holding `caches` (batch 1 each, same tokens seen) side by side, without a method.

    Compressed layers of different sizes are padded with invalid slots (`valid` = False: the mask hides them;
    `CompressedLayer.stack_rows`); other layers (sliding windows, never compressed) are concatenated. The merged
    cache compresses nothing: it serves prefill-only methods, whose caches no longer change after the prefill.
    `room`: slots reserved after the stored ones in every compressed layer (the question plus the answer budget),
    so that appending them copies nothing (`DenseStore.reserve`); 0 appends by concatenation."""
    from ..storage.layer import CompressedLayer

    out = CompressedCache(model, None)
    for i, layer in enumerate(out.layers):
        srcs = [c.layers[i] for c in caches]
        if not srcs[0].is_initialized:
            continue
        if isinstance(layer, CompressedLayer):
            layer.stack_rows(srcs, room)
        else:
            layer.__dict__.update({k: v for k, v in srcs[0].__dict__.items() if k not in ("keys", "values")})
            layer.keys = torch.cat([s.keys for s in srcs])
            layer.values = torch.cat([s.values for s in srcs])
    out._forwards = 1
    out._prefill_open = False  # the question is appended uncompressed
    out.phase = "append"
    return out


@torch.no_grad()
def answer_batch(model, tokenizer, caches: list[CompressedCache], q_ids: list[int], max_new_tokens: int,
                 eos: set[int]) -> list[str]:
    """Greedy answers to the same question from several caches at once (one forward per step for all).

    Each row is what `greedy_decode` gives from its own cache; rows are independent (batched float reductions
    may differ in the last bits from batch-1 ones: `--batch-size 1` decodes pairs one by one, and the benchmark
    checks the answers against re-prefilling)."""
    p = len(caches)
    cache = merge_caches(model, caches, room=len(q_ids) + max_new_tokens)
    device = _device(model)
    outs = answer_tokens(model, cache, torch.tensor([q_ids] * p, device=device), max_new_tokens, eos)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]


def attach_selector(cache: CompressedCache, pair: Pair, record=None) -> CompressedCache:
    """Give a cache built from a shared record `pair`'s selector, reset, as if it had been there at the prefill:
    the record's multi-token forward is replayed to `selector.observe` layer by layer (over the uncompressed
    layer, before eviction, as the attention wrapper calls it)."""
    sel = pair.selector
    if sel is None:
        return cache
    sel.reset()
    cache.selector = sel
    if record is not None:
        from ..storage.layer import CompressedLayer

        for i, layer in enumerate(record.cache.layers):
            if isinstance(layer, CompressedLayer) and layer.is_initialized and i in record.queries:
                sel.observe(i, layer, record.queries[i])
    return cache


@torch.no_grad()
def fresh_answer(model, tokenizer, sample: Sample, pair: Pair, chunk_size, eos):
    """`generate_answer` for one pair (its own prefill), also returning the 16-bit bytes of the compressed
    context: (answer, stats, (kv_bytes_16, full_kv_bytes_16), n_context, n_question)."""
    ctx, q = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    if pair.query_aware:
        ctx, q = ctx + q[:-1], q[-1:]
    check_budget(pair.method, len(ctx))
    if pair.selector is not None:
        pair.selector.reset()
    cache = CompressedCache(model, pair.method, layer_factory=pair.layer_factory, selector=pair.selector,
                            offload=pair.offload)
    prefill(model, cache, torch.tensor([ctx], device=_device(model)), chunk_size)
    stats, b16 = cache.stats(), bytes_16(cache)
    answer = _answer_from_cache(model, tokenizer, cache, q, sample.max_new_tokens, eos)
    return answer, stats, b16, len(ctx), len(q)


def capped_method(m: Method, n_prefix: int) -> Method:
    """The method holding the cache at its prefill budget while the scored tokens are fed (perplexity task)."""
    if m.name == "full":
        return m
    budget = m.budget if m.budget is not None else max(1, int(n_prefix * (1.0 - m.compression_ratio)))
    return dataclasses.replace(m, budget=budget, compression_interval=m.compression_interval or 1)


@torch.no_grad()
def capped_perplexity(model, cache: CompressedCache, fed: list[int], targets: list[int]) -> float:
    """Mean NLL of `targets`, feeding `fed` one token at a time on top of `cache` (which keeps compressing)."""
    device = _device(model)
    nll = 0.0
    for tok_in, tok_out in zip(fed, targets):
        logits = decode_step(model, cache, torch.tensor([tok_in], device=device))[0]
        nll -= float(torch.log_softmax(logits.float(), -1)[tok_out])
    return nll / len(targets)


# --- the sweep ------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    added: int = 0
    skipped: int = 0  # keys already in the store
    prefills: int = 0  # shared prefills run
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    # (task, sample_id, method, params_json, compression_ratio) -> prediction
    answers: dict = field(default_factory=dict)


def run_sweep(model, tokenizer, samples: list[Sample], pairs: list[Pair], store: ResultStore | None = None, *,
              model_name: str, seed: int = 0, code_version: str | None = None, share_prefill: bool = True,
              chunk_size: int | None = None, progress: bool = True, keep_answers: bool = False,
              batch_size: int = 8, dist=None) -> SweepResult:
    """Evaluate every pair on every sample; rows already in `store` are skipped, new ones stored one by one.

    `batch_size`: prefill-only pairs of a sample answer together, that many caches per batched decode (1: one
    pair at a time, exactly `greedy_decode`). `dist`: a `distributed.DistInfo` of a torchrun job (every rank
    calls this with the same samples and pairs): all ranks read the stored keys, meet at a barrier, then each
    computes the samples with pending rows at index i % world == rank; `added` / `prefills` are this rank's,
    `skipped` counts the whole store."""
    code_version = code_version or default_code_version()
    res = SweepResult()
    t_start = time.perf_counter()
    done = store.done_keys(model_name, code_version) if store is not None else set()
    todo: list[tuple[Sample, list[Pair]]] = []
    for s in samples:
        pending = [p for p in pairs if (model_name, p.name, p.params_json, p.compression_ratio, s.task, s.sample_id,
                                        seed, code_version) not in done]
        res.skipped += len(pairs) - len(pending)
        if pending:
            todo.append((s, pending))
    if dist is not None and dist.active:
        todo = dist.shard(todo)  # every rank filtered the same snapshot (the barrier below comes before writes)
    total = sum(len(p) for _, p in todo)
    max_pos = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if dist is not None and dist.active and not dist.is_main:
        dist.barrier()  # rank 0 sets the methods up first (Q-Filters calibrates and saves once)
    for m in {id(p.method): p.method for p in pairs}.values():
        prepare(m, model)  # Q-Filters loads (or calibrates) its filters once, not once per cache
    if dist is not None and dist.active and dist.is_main:
        dist.barrier()
    for p in pairs:
        if p.selector is not None:
            p.selector.setup(model)  # an untrained AttentionPredictor is refused here, before any row
    eos = _eos_ids(model, tokenizer)
    if dist is not None and dist.active:
        dist.barrier()  # no rank writes a row before every rank has read the stored keys
    meta_extra = {"dist_rank": dist.rank, "dist_world": dist.world} if dist is not None and dist.active else {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        print(f"{total} rows to compute ({res.skipped} already stored) over {len(todo)} samples", file=sys.stderr)
        bar = tqdm(total=total, unit="row", dynamic_ncols=True, file=sys.stderr, desc="sweep")
    try:
        for sample, pending in todo:
            _run_sample(model, tokenizer, sample, pending, store, res, model_name=model_name, seed=seed,
                        code_version=code_version, share=share_prefill, chunk_size=chunk_size, eos=eos,
                        max_pos=max_pos, bar=bar, keep_answers=keep_answers, batch_size=batch_size,
                        meta_extra=meta_extra)
    finally:
        if bar is not None:
            bar.close()
    res.seconds = time.perf_counter() - t_start
    return res


@torch.no_grad()
def _run_sample(model, tokenizer, sample: Sample, pending: list[Pair], store, res: SweepResult, *, model_name,
                seed, code_version, share, chunk_size, eos, max_pos, bar, keep_answers, batch_size,
                meta_extra=None):
    ppl = sample.metric == "perplexity"
    if ppl:
        ids = tokenizer(sample.context).input_ids
        k = int(sample.meta.get("n_scored", 64))
        if len(ids) < 2 * k + 2:
            raise KVSqueezeError(f"{sample.task}/{sample.sample_id}: text too short for {k} scored tokens")
        prefix, fed, targets = ids[: len(ids) - k - 1], ids[len(ids) - k - 1 : -1], ids[len(ids) - k :]
        n_total = len(ids)
    else:
        ctx_ids, q_ids = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
        n_total = len(ctx_ids) + len(q_ids) + sample.max_new_tokens
    if max_pos and n_total > max_pos:
        raise KVSqueezeError(f"{sample.task}: {n_total} tokens exceed the model's {max_pos} positions")
    device = _device(model)
    records: dict[bool, object] = {}  # query_aware -> PrefillRecord

    def record_for(query_aware: bool):
        if query_aware not in records:
            t0 = time.perf_counter()
            ids_ = prefix if ppl else (ctx_ids + q_ids[:-1] if query_aware else ctx_ids)
            records[query_aware] = record_prefill(model, torch.tensor([ids_], device=device))
            res.prefills += 1
            res.prefill_seconds += time.perf_counter() - t0
        return records[query_aware]

    def emit(pair, value, metrics, prediction, stats, n_ctx, n_q, protocol, seconds, b16, digest=None):
        if keep_answers:
            res.answers[(sample.task, sample.sample_id, pair.name, pair.params_json, pair.compression_ratio)] = (
                prediction if not ppl else round(value, 6))
        row = {
            "model": model_name, "method": pair.name, "params_json": pair.params_json,
            "compression_ratio": pair.compression_ratio,
            "task": sample.task, "sample_id": sample.sample_id, "seed": seed, "code_version": code_version,
            "metric": sample.metric, "score": value, "metrics_json": metrics, "prediction": prediction,
            "answers_json": sample.answers, "kv_bytes": stats.kv_bytes, "total_bytes": stats.total_bytes,
            "full_kv_bytes": stats.full_kv_bytes, "n_context_tokens": n_ctx, "n_question_tokens": n_q,
            "length": sample.meta.get("length"), "depth": sample.meta.get("depth"),
            "meta_json": {**sample.meta, **(meta_extra or {}), **({"kept_digest": digest} if digest else {})},
            "protocol": protocol,
            "seconds": seconds,
            "quant": pair.quant, "select": pair.select, "select_budget": pair.select_budget,
            "kv_bytes_16": b16[0], "full_kv_bytes_16": b16[1],
        }
        if store is None or store.add(row):
            res.added += 1
        if bar is not None:
            bar.set_postfix_str(f"{sample.task} {pair.label()}", refresh=False)
            bar.update(1)

    shared_qa: list[Pair] = []
    for pair in pending:
        m = pair.method
        shared = share and chunk_size is None and is_prefill_only(m)
        t0 = time.perf_counter()
        if ppl:
            mm = capped_method(pair.base or m, len(prefix))
            check_budget(mm if mm.name != "full" else None, len(prefix))
            mm = pair.run_method(mm)
            if shared:
                rec = record_for(False)
                cache = pair.cache(attach_selector(rec.compress(model, mm, pair.layer_factory), pair, rec))
                protocol = "capped-ppl"
            else:
                if pair.selector is not None:
                    pair.selector.reset()
                cache = CompressedCache(model, mm, layer_factory=pair.layer_factory, selector=pair.selector,
                                        offload=pair.offload)
                prefill(model, cache, torch.tensor([prefix], device=device), chunk_size)
                protocol = "capped-ppl-re-prefill"
            stats, b16, digest = cache.stats(), bytes_16(cache), kept_digest(cache)
            nll = capped_perplexity(model, cache, fed, targets)
            del cache
            value = math.exp(nll)
            emit(pair, value, {"perplexity": value, "nll": nll, "n_scored": len(targets)}, "", stats, len(prefix), 0,
                 protocol, time.perf_counter() - t0, b16, digest)
        elif shared:
            shared_qa.append(pair)
        else:
            answer, st, b16, n_c, n_q = fresh_answer(model, tokenizer, sample, pair, chunk_size, eos)
            metrics = score(sample, answer)
            emit(pair, metrics[sample.metric], metrics, answer, st, n_c, n_q, "re-prefill", time.perf_counter() - t0,
                 b16)

    # prefill-only QA pairs: compress from the shared record; answers decoded `batch_size` caches at a time,
    # caches of similar size together (less padding)
    def kept(p: Pair) -> float:
        return -(p.method.budget or 0) if p.method.budget is not None else -(1.0 - p.compression_ratio)

    for qa in (False, True):
        group = sorted((p for p in shared_qa if p.query_aware == qa), key=kept)
        if not group:
            continue
        c_ids, qq = (ctx_ids + q_ids[:-1], q_ids[-1:]) if qa else (ctx_ids, q_ids)
        plain = [p for p in group if not p.exact_alone]
        chunks = [plain[s : s + max(1, batch_size)] for s in range(0, len(plain), max(1, batch_size))]
        chunks += [[p] for p in group if p.exact_alone]  # quantized storage / selector: each from its own cache
        for chunk in chunks:
            t0 = time.perf_counter()
            caches, stats, b16s, digests = [], [], [], []
            for pair in chunk:
                check_budget(pair.method, len(c_ids))
                rec = record_for(qa)
                cache = pair.cache(attach_selector(rec.compress(model, pair.method, pair.layer_factory), pair, rec))
                caches.append(cache)
                stats.append(cache.stats())
                b16s.append(bytes_16(cache))
                digests.append(kept_digest(cache))
            if len(chunk) > 1:
                answers = answer_batch(model, tokenizer, caches, qq, sample.max_new_tokens, eos)
            else:
                answers = [_answer_from_cache(model, tokenizer, caches[0], qq, sample.max_new_tokens, eos)]
            protocol = "shared-prefill"
            del caches
            seconds = (time.perf_counter() - t0) / len(chunk)
            for pair, st, answer, b16, digest in zip(chunk, stats, answers, b16s, digests):
                metrics = score(sample, answer)
                emit(pair, metrics[sample.metric], metrics, answer, st, len(c_ids), len(qq), protocol, seconds, b16,
                     digest)
