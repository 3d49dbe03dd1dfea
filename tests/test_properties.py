"""Property tests (hypothesis) of the cache invariants (issue 10's acceptance), over random tiny Llama shapes,
prompt lengths, chunkings, methods, budgets, attention kernels and decode schedules.

1. No compression (`full`, compression_ratio 0, no method) = `transformers.DynamicCache`, bit for bit, every forward.
2. Eviction = the uncompressed model with exactly the (layer, kv head, position) entries the cache reports as not
   held masked out (read from `layer.positions` / `layer.valid` before every forward), every forward's logits.
3. A left-padded batch: every row keeps the positions it keeps alone, and its logits equal the row alone.
4. Quantized stores (KIVI-2/4, GEAR-4, MiKV-8-2): the bytes reported never exceed the full-precision bytes of the
   slots held, and with a residual window covering every token seen the logits equal the unquantized cache's.
5. Head-wise budgets (AdaKV, when registered): per-head counts sum to the layer budget x kv heads; property 2 holds.

Only the public API is used (`CompressedCache`, `METHODS` / `get_method`, `kvsqueeze.quant`, `cache.layers[i]
.positions / .valid`, `cache.stats()`), so the properties hold across rewrites of the storage underneath.
`derandomize=True`: CI draws the same examples every run; a failure prints its falsifying example.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, note, settings, strategies as st
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import kvsqueeze as kq
from kvsqueeze import quant

from conftest import kv

VOCAB = 101
TOL = 1e-4  # fp32: sdpa / eager against the reference's plain softmax


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, print_blob=True,
                    phases=[Phase.explicit, Phase.generate, Phase.target, Phase.shrink],  # no slow 'explain'
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (conftest's `one_thread`)."""


# --- models -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    kv_heads: int
    group: int  # query heads per kv head (GQA)
    head_dim: int

    @property
    def seed(self) -> int:
        return 1000 * self.layers + 100 * self.kv_heads + 10 * self.group + self.head_dim


shapes = st.builds(Shape, layers=st.integers(1, 3), kv_heads=st.integers(1, 2), group=st.integers(1, 3),
                   head_dim=st.sampled_from([8, 16]))
attns = st.sampled_from(["sdpa", "eager"])


@functools.lru_cache(maxsize=None)
def _model(shape: Shape, attn: str):
    """A tiny random Llama, the same weights for the same shape (seed from the shape)."""
    torch.manual_seed(shape.seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=shape.layers,
                      num_attention_heads=shape.kv_heads * shape.group, num_key_value_heads=shape.kv_heads,
                      head_dim=shape.head_dim, max_position_embeddings=256, attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


# --- the reference: full cache, masking the entries the compressed cache did not hold ---------------------------
_REF: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Plain attention over the full DynamicCache, hiding every (kv head, position) that `_REF["held"]` (per layer:
    positions, valid of the compressed cache before this forward) does not hold; this forward's own tokens are
    visible (causality comes from `attention_mask`)."""
    g = query.shape[1] // key.shape[1]
    n, q = key.shape[-2], query.shape[-2]
    logits = query @ key.repeat_interleave(g, dim=1).transpose(-1, -2) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., :n]
    held = _REF["held"][module.layer_idx]
    if held is not None:
        pos, valid = held
        allowed = torch.zeros(key.shape[0], key.shape[1], n, dtype=torch.int32)
        allowed.scatter_add_(2, pos.long(), valid.int())  # duplicates (invalid filler slots) add nothing
        allowed = allowed > 0
        allowed[:, :, n - q :] = True
        logits = logits.masked_fill(~allowed.repeat_interleave(g, dim=1)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(query.dtype)
    return (probs @ value.repeat_interleave(g, dim=1)).transpose(1, 2).contiguous(), probs


AttentionInterface.register("kvsq_prop_ref", _reference_attention)
AttentionMaskInterface.register("kvsq_prop_ref", eager_mask)


@functools.lru_cache(maxsize=None)
def _ref_model(shape: Shape):
    m = copy.deepcopy(_model(shape, "eager"))
    m.set_attn_implementation("kvsq_prop_ref")
    return m


def _held(cache) -> list:
    """Per layer: (positions, valid) of the slots held, (batch, kv_heads, n) each, or None before any token."""
    out = []
    for layer in cache.layers:
        pos = getattr(layer, "positions", None)
        if pos is None or pos.shape[-1] == 0:
            out.append(None)
            continue
        valid = getattr(layer, "valid", None)
        out.append((pos.clone(), torch.ones_like(pos, dtype=torch.bool) if valid is None else valid.clone()))
    return out


def _head_counts(layer) -> torch.Tensor:
    """(batch, kv_heads): the visible slots each row and kv head holds."""
    valid = getattr(layer, "valid", None)
    if valid is None:
        return torch.full(layer.positions.shape[:2], layer.positions.shape[-1])
    return valid.sum(-1)


# --- methods ------------------------------------------------------------------------------------------------------
def _needs_calibration(name: str) -> bool:
    return getattr(kq.METHODS[name], "calibration", None) is not None and name != "qfilters"


# cross-layer stores (MiniCache, xKV) change the values held (lossy storage, like quantization): their rules are
# tested in test_crosslayer.py, not by these exactness properties
ALL = [n for n in kq.METHODS if not _needs_calibration(n) and not hasattr(kq.METHODS[n], "cross_layer_plan")]
# property 2 compares with the uncompressed cache's entries masked: merging methods (KVMerger, D2O, EMS) change the
# entries they keep (tests/test_merge.py and tests/test_merging_methods.py check their merges)
EVICTING = [n for n in ALL if n != "full" and not kq.METHODS[n].merges]
SCORERS = [n for n in ("snapkv", "tova", "knorm", "h2o", "qfilters", "streaming_llm", "random") if n in kq.METHODS]


@st.composite
def amounts(draw, max_budget: int = 48) -> dict:
    if draw(st.booleans()):
        return {"compression_ratio": draw(st.sampled_from([0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9]))}
    return {"budget": draw(st.integers(1, max_budget))}


def _extra(draw, name: str, shape: Shape) -> dict:
    """Method-specific fields, drawn; Q-Filters get random filters of the right shape (no calibration)."""
    if name == "snapkv":
        return {"window": draw(st.integers(1, 16)), "kernel_size": draw(st.sampled_from([1, 3, 5]))}
    if name == "h2o":
        return {"recent_share": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0]))}
    if name == "streaming_llm":
        return {"n_sink": draw(st.integers(0, 8))}
    if name == "random":
        return {"seed": draw(st.integers(0, 3))}
    if name == "qfilters":
        gen = torch.Generator().manual_seed(draw(st.integers(0, 3)))
        return {"filters": torch.randn(shape.layers, shape.kv_heads, shape.head_dim, generator=gen),
                "window": draw(st.integers(0, 8))}
    fields = {f.name for f in dataclasses.fields(kq.METHODS[name])}
    out = {}
    if "scorer" in fields:  # PyramidKV, AdaKV: over any scorer
        scorer = draw(st.sampled_from(SCORERS))
        out["scorer"] = kq.get_method(scorer, **_extra(draw, scorer, shape))
    if "beta" in fields:
        out["beta"] = draw(st.sampled_from([1.0, 4.0, 20.0]))
    return out


@st.composite
def method_makers(draw, shape: Shape, names=tuple(EVICTING), amount=None):
    """A zero-argument function building a fresh method (the same one each call: stateful methods start anew)."""
    name = draw(st.sampled_from(list(names)))
    kw = dict(amount if amount is not None else draw(amounts()), compression_interval=draw(st.sampled_from([0, 1])))
    kw.update(_extra(draw, name, shape))
    note(f"method {name} {kw}")
    return lambda: kq.get_method(name, **copy.deepcopy(kw))


# --- schedules ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Schedule:
    chunks: list  # (1, q) id tensors
    n_prefill: int  # the first n_prefill chunks are the prefill
    blocks: bool  # prefill chunks inside `with cache.prefill()` (else the cache infers the phases)


@st.composite
def schedules(draw, max_len: int = 64):
    n = draw(st.integers(8, max_len))
    k = draw(st.integers(1, 3))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1, unique=True)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, n])]
    after = draw(st.lists(st.sampled_from([1, 1, 1, 3]), min_size=1, max_size=4))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    chunks = [torch.randint(0, VOCAB, (1, s), generator=gen) for s in sizes + after]
    note(f"chunks {sizes} + {after}")
    return Schedule(chunks, len(sizes), draw(st.booleans()))


def _run(model, cache, sched: Schedule, check=None) -> list[torch.Tensor]:
    """Every forward's logits; `check(i, held)` sees what the cache held before forward i."""
    outs = []
    for i, ids in enumerate(sched.chunks):
        if check is not None:
            check(i, _held(cache))
        block = sched.blocks and i < sched.n_prefill and isinstance(cache, kq.CompressedCache)
        with torch.no_grad(), (cache.prefill() if block else contextlib.nullcontext()):
            outs.append(model(ids, **kv(cache)).logits)
    return outs


def _reference(shape: Shape, sched: Schedule, helds: list) -> list[torch.Tensor]:
    model = _ref_model(shape)
    dyn = DynamicCache(config=model.config)
    outs = []
    for ids, held in zip(sched.chunks, helds):
        _REF["held"] = held
        with torch.no_grad():
            outs.append(model(ids, **kv(dyn)).logits)
    return outs


def _assert_masked_reference(shape: Shape, attn: str, make_method, sched: Schedule, layer_factory=None):
    """Property 2 for one draw; returns the cache."""
    model = _model(shape, attn)
    cache = kq.CompressedCache(model, make_method(), layer_factory=layer_factory)
    helds = []
    got = _run(model, cache, sched, check=lambda i, held: helds.append(held))
    ref = _reference(shape, sched, helds)
    seen = cache.get_seq_length()
    evicted = any(h is not None and int(h[1].sum(-1).min()) < seen for h in _held(cache))
    event(f"evicted: {evicted}")
    for i, (a, b) in enumerate(zip(got, ref)):
        diff = float((a - b).abs().max())
        assert diff < TOL, f"forward {i}: logits differ from the masked full-cache reference by {diff:.3g}"
    return cache


# --- 1. no compression = DynamicCache, bit for bit ----------------------------------------------------------------
@st.composite
def keep_all(draw, shape: Shape):
    kind = draw(st.sampled_from(["none", "full", "ratio0"]))
    if kind == "none":
        return lambda: None
    if kind == "full":
        return lambda: kq.get_method("full")
    return draw(method_makers(shape, names=ALL, amount={"compression_ratio": 0.0}))


@given(data=st.data(), shape=shapes, attn=attns)
@_settings(50)
def test_no_compression_is_dynamic_cache_bit_for_bit(data, shape, attn):
    sched = data.draw(schedules())
    make = data.draw(keep_all(shape))
    model = _model(shape, attn)
    ref = _run(model, DynamicCache(config=model.config), sched)
    got = _run(model, kq.CompressedCache(model, make()), sched)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"forward {i}: differs from DynamicCache by {float((a - b).abs().max()):.3g}"


# --- 2. eviction = full attention with the entries not held masked ----------------------------------------------
@given(data=st.data(), shape=shapes, attn=attns)
@_settings(120)
def test_eviction_is_full_attention_with_the_entries_not_held_masked(data, shape, attn):
    sched = data.draw(schedules())
    _assert_masked_reference(shape, attn, data.draw(method_makers(shape)), sched)


# --- 3. left-padded batches: each row as alone ----------------------------------------------------------------------
def _generate(model, ids, mask, cache, new_tokens, chunk):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, **kv(cache), max_new_tokens=new_tokens, do_sample=False,
                              min_new_tokens=new_tokens,  # an EOS would end a row alone early, not its batch
                              output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                              prefill_chunk_size=chunk)


def _kept(cache, row: int, pad: int) -> list:
    """Per layer and kv head: the sorted positions (from the row's first real token) of the row's visible slots."""
    out = []
    for held in _held(cache):
        pos, valid = held[0][row].long() - pad, held[1][row]
        out.append([sorted(pos[h][valid[h]].tolist()) for h in range(pos.shape[0])])
    return out


@given(data=st.data(), shape=shapes, attn=attns)
@_settings(40)
def test_left_padded_rows_equal_rows_alone(data, shape, attn):
    """Every row of a left-padded batch keeps the positions it keeps alone and has the same logits. With
    `prefill_chunk_size` the chunks are cut in the batch's (padded) coordinates, so a padded row is chunked
    differently from the row alone and legitimately compressed differently (a compression_ratio budget follows the
    tokens seen so far): there each row is compared with the row alone under the same left padding (batch
    independence)."""
    lengths = data.draw(st.lists(st.integers(8, 40), min_size=2, max_size=3), label="row lengths")
    width = max(lengths) + data.draw(st.integers(0, 6), label="extra padding")
    new_tokens = data.draw(st.integers(1, 4), label="new tokens")
    chunk = data.draw(st.sampled_from([None, None, 8, 16]), label="prefill_chunk_size")
    make = data.draw(method_makers(shape, names=ALL))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="ids seed"))
    rows = [torch.randint(1, VOCAB, (n,), generator=gen) for n in lengths]
    pads = [width - n for n in lengths]
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, (r, p) in enumerate(zip(rows, pads)):
        ids[i, p:], mask[i, p:] = r, 1
    model = _model(shape, attn)
    batch_cache = kq.CompressedCache(model, make())
    batch = _generate(model, ids, mask, batch_cache, new_tokens, chunk)
    for r, row in enumerate(rows):
        alone_pad = pads[r] if chunk else 0
        alone_ids, alone_mask = (ids[r : r + 1], mask[r : r + 1]) if chunk else (row[None], torch.ones_like(row)[None])
        alone_cache = kq.CompressedCache(model, make())
        alone = _generate(model, alone_ids, alone_mask, alone_cache, new_tokens, chunk)
        assert _kept(batch_cache, r, pads[r]) == _kept(alone_cache, 0, alone_pad), (
            f"row {r} (padding {pads[r]}) kept other tokens")
        for step, (lb, la) in enumerate(zip(batch.logits, alone.logits)):
            diff = float((lb[r] - la[0]).abs().max())
            assert diff < TOL, f"row {r} (padding {pads[r]}), step {step}: logits differ by {diff:.3g}"


# --- 4. quantized stores ------------------------------------------------------------------------------------------
SPECS = ["kivi-2", "kivi-4", "gear-4", "mikv-8-2"]


def _factory(spec: str, group: int, residual: int):
    """The scheme `spec` (parse_quant's names) with the token group and full-precision residual window given."""
    name, *bits = spec.split("-")
    bits = [int(b) for b in bits]
    if name == "kivi":
        return quant.kivi(bits[0], group=group, residual=residual)
    if name == "gear":
        return quant.gear(bits[0], group=group, residual=residual)
    return quant.mikv(bits[0], bits[1], group=group, residual=residual)


@st.composite
def quant_draws(draw, shape: Shape):
    spec = draw(st.sampled_from(SPECS))
    qspec = quant.parse_quant(spec)
    wrap = functools.partial(kq.methods.for_storage, qspec=qspec)  # MiKV wraps the method; KIVI / GEAR keep it
    make = draw(st.one_of(st.just(lambda: None), method_makers(shape)))
    group = draw(st.sampled_from([4, 8, 16, 32]))
    residual = group * draw(st.integers(0, 2))
    note(f"quant {spec} group {group} residual {residual}")
    return spec, (lambda: wrap(make())), make, group, residual


@given(data=st.data(), shape=shapes, attn=attns)
@_settings(40)
def test_quantized_bytes_never_exceed_full_precision_bytes_of_the_slots_held(data, shape, attn):
    sched = data.draw(schedules())
    spec, make, _, group, residual = data.draw(quant_draws(shape))
    model = _model(shape, attn)
    cache = kq.CompressedCache(model, make(), layer_factory=_factory(spec, group, residual))
    fp_bytes = torch.finfo(model.dtype).bits // 8
    # MiKV's key balancer: one scale per channel, per (layer, row, kv head), held and counted even while every
    # token is still in the full-precision residual (a known overhead, reported; not part of the slots' bytes)
    balancer = shape.head_dim * fp_bytes if spec.startswith("mikv") else 0

    def check(i, held):
        if i == 0:
            return
        full = sum(2 * int(h[1].sum()) * shape.head_dim * fp_bytes + balancer * h[0].shape[0] * h[0].shape[1]
                   for h in held if h is not None)
        kv_bytes = cache.stats().kv_bytes
        assert kv_bytes <= full, f"before forward {i}: {kv_bytes} bytes reported > {full} in full precision"

    _run(model, cache, sched, check=check)
    check(len(sched.chunks), _held(cache))


@given(data=st.data(), shape=shapes, attn=attns)
@_settings(30)
def test_quantized_store_with_everything_in_the_residual_equals_full_precision(data, shape, attn):
    sched = data.draw(schedules())
    spec, make, make_plain, group, _ = data.draw(quant_draws(shape))
    seen = sum(c.shape[-1] for c in sched.chunks)
    residual = group * -(-seen // group)  # >= every token seen: nothing is ever quantized
    model = _model(shape, attn)
    got = _run(model, kq.CompressedCache(model, make(), layer_factory=_factory(spec, group, residual)), sched)
    # MiKV never evicts (it demotes to low precision, here never reached): its unquantized equal is no eviction
    plain = (lambda: None) if spec.startswith("mikv") else make_plain
    ref = _run(model, kq.CompressedCache(model, plain()), sched)
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, b, msg=lambda m: f"forward {i}: {m}")


def test_pyramidkv_at_ratio_zero_keeps_every_token():
    """Found by property 1: PyramidKV(compression_ratio=0) evicted from its upper layers (the pyramid of a full budget)."""
    shape = Shape(layers=3, kv_heads=2, group=2, head_dim=8)
    model = _model(shape, "sdpa")
    cache = kq.CompressedCache(model, kq.get_method("pyramidkv", compression_ratio=0.0, beta=4.0, scorer=kq.get_method("tova")))
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    kq.prefill(model, cache, ids)
    assert cache.stats().tokens_stored == [40] * 3


def test_padded_row_keeps_its_own_budget_after_a_chunk_that_was_mostly_padding():
    """Found by property 3: with `prefill_chunk_size` 8, a row with 7 padding tokens of 15 kept 8 slots where it keeps
    7 alone (compression_ratio 0.1 of its 8 tokens): the layer held exactly the longer row's budget (8), so the
    per-row budget was never applied."""
    model = _model(Shape(layers=1, kv_heads=1, group=1, head_dim=8), "sdpa")
    make = lambda: kq.get_method("streaming_llm", compression_ratio=0.1, n_sink=0)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(2, 15, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate((8, 9)):
        ids[r, 15 - n :], mask[r, 15 - n :] = torch.randint(1, VOCAB, (n,), generator=gen), 1
    batch_cache, alone_cache = kq.CompressedCache(model, make()), kq.CompressedCache(model, make())
    batch = _generate(model, ids, mask, batch_cache, 1, 8)
    alone = _generate(model, ids[:1], mask[:1], alone_cache, 1, 8)
    assert _kept(alone_cache, 0, 7) == [[list(range(1, 8))]]  # int(8 * 0.9) = 7 of the row's 8 tokens
    assert _kept(batch_cache, 0, 7) == _kept(alone_cache, 0, 7)
    torch.testing.assert_close(batch.logits[0][:1], alone.logits[0], atol=TOL, rtol=0)


# --- 5. head-wise budgets -----------------------------------------------------------------------------------------
HEADWISE = [n for n in ("adakv",) if n in kq.METHODS]


@pytest.mark.skipif(not HEADWISE, reason="no head-wise method registered yet (AdaKV)")
@given(data=st.data(), shape=shapes, attn=attns)
@_settings(40)
def test_headwise_budgets_sum_to_the_layer_budget_and_mask_like_eviction(data, shape, attn):
    sched = data.draw(schedules())
    make = data.draw(method_makers(shape, names=HEADWISE))
    cache = _assert_masked_reference(shape, attn, make, sched)
    # after the prefill: every layer holds, over all its kv heads, what the scorer alone holds with the same budget
    # (the layer's budget x kv heads when the prefill compressed), however the heads share it
    import copy

    model = _model(shape, attn)
    cache = kq.CompressedCache(model, make())
    base = kq.CompressedCache(model, copy.deepcopy(cache.method.scorer))
    prefill_sched = Schedule(sched.chunks[: sched.n_prefill], sched.n_prefill, sched.blocks)
    _run(model, cache, prefill_sched)
    _run(model, base, prefill_sched)
    for li, (layer, ref) in enumerate(zip(cache.layers, base.layers)):
        counts = _head_counts(layer)  # (1, kv_heads)
        assert int(counts.sum()) == int(_head_counts(ref).sum()), f"layer {li}: {counts.tolist()} vs the scorer's"
        event(f"per-head counts differ: {len(set(counts.flatten().tolist())) > 1}")
