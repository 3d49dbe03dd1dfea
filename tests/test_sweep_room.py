"""The merged answer batch appends into preallocated room (no copy of the cache per decoding step) and answers
exactly as the plain concatenating merge does."""

from __future__ import annotations

import pytest
import torch

from conftest import loaded_in_own_cache, save_tiny_llama_with_smollm2_tokenizer
from kvsqueeze.evaluation import make_pairs
from kvsqueeze.evaluation.sweep import answer_batch, merge_caches
from kvsqueeze.compat import cache_kwargs
from kvsqueeze.runtime.generate import _eos_ids, record_prefill, split_prompt
from kvsqueeze.tasks import TaskConfig, build_samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = save_tiny_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llama"))
    with loaded_in_own_cache(d, tmp_path_factory.mktemp("kvs-cache")) as loaded:
        yield loaded


def test_room_gives_the_logits_and_answers_of_concatenation(tiny):
    model, tok = tiny
    s = build_samples(tok, "passkey", TaskConfig(length=320, samples=1))[0]
    ctx, q = split_prompt(tok, s.context, s.question, s.answer_prefix)
    rec = record_prefill(model, torch.tensor([ctx]))
    pairs = make_pairs(["snapkv", "tova", "knorm", "streaming_llm"], [0.3, 0.6, 0.85])
    caches = lambda: [rec.compress(model, p.method) for p in pairs]  # noqa: E731
    plain, roomy = merge_caches(model, caches()), merge_caches(model, caches(), room=len(q) + 5)
    layer = roomy.layers[0]
    assert layer.store.room == len(q) + 5 and not layer.keys.is_contiguous()  # a view into its buffer
    buf = layer.store.tensors()["keys"].data_ptr()
    ids = torch.tensor([q] * len(pairs))
    with torch.no_grad():
        for step in range(6):  # the question, then 5 one-token steps (the room is exactly used up)
            a = model(input_ids=ids, **cache_kwargs(model, plain)).logits[:, -1]
            b = model(input_ids=ids, **cache_kwargs(model, roomy)).logits[:, -1]
            assert torch.equal(a, b)
            assert layer.keys.data_ptr() == buf  # appended in place, no copy
            for pl, rl in zip(plain.layers, roomy.layers):
                assert torch.equal(pl.keys, rl.keys) and torch.equal(pl.positions, rl.positions)
                assert torch.equal(pl.valid, rl.valid) and pl.cumulative_length == rl.cumulative_length
            ids = a.argmax(-1)[:, None]
        # past the room it falls back to concatenation, still equal
        a = model(input_ids=ids, **cache_kwargs(model, plain)).logits[:, -1]
        b = model(input_ids=ids, **cache_kwargs(model, roomy)).logits[:, -1]
        assert torch.equal(a, b) and layer.store.room == 0
    # answer_batch (which reserves room) answers as each cache alone
    eos = _eos_ids(model, tok)
    got = answer_batch(model, tok, caches(), q, 8, eos)
    from kvsqueeze.evaluation.sweep import _answer_from_cache

    alone = [_answer_from_cache(model, tok, c, q, 8, eos) for c in caches()]
    assert got == alone and len(set(alone)) > 2


def test_row_runs_attend_each_row_alone_and_skip_idle_rows(tiny, monkeypatch):
    """The merged batch is right-aligned: each row's slots (and what is appended) are one run, which a decoding
    step attends to row by row (no padding read); finished (idle) rows are skipped without changing the others."""
    import kvsqueeze.runtime.attention as att

    model, tok = tiny
    s = build_samples(tok, "passkey", TaskConfig(length=320, samples=1))[0]
    ctx, q = split_prompt(tok, s.context, s.question, s.answer_prefix)
    rec = record_prefill(model, torch.tensor([ctx]))
    pairs = make_pairs(["snapkv", "tova", "streaming_llm"], [0.3, 0.6, 0.85])
    caches = lambda: [rec.compress(model, p.method) for p in pairs]  # noqa: E731
    srcs = caches()
    merged = merge_caches(model, caches(), room=len(q) + 4)
    layer = merged.layers[0]
    n = layer.n_stored
    runs = layer.row_runs()
    assert runs == [n - c.layers[0].n_stored for c in srcs] and len(set(runs)) > 1
    for i, c in enumerate(srcs):  # right-aligned: row i's own slots end at slot n - 1
        assert torch.equal(layer.keys[i, :, runs[i]:], c.layers[0].keys[0])
        assert not layer.valid[i, :, : runs[i]].any() and layer.valid[i, :, runs[i]:].all()
    calls = []
    real = att._attend_row_runs
    monkeypatch.setattr(att, "_attend_row_runs", lambda *a: calls.append(1) or real(*a))
    masked = merge_caches(model, caches(), room=len(q) + 4)
    for lay in masked.layers:
        lay.row_starts = None  # the masked batched path, for comparison
    ids = torch.tensor([q] * len(pairs))
    with torch.no_grad():
        a = model(input_ids=ids, **cache_kwargs(model, merged)).logits[:, -1]
        b = model(input_ids=ids, **cache_kwargs(model, masked)).logits[:, -1]
        alone = torch.cat([model(input_ids=torch.tensor([q]), **cache_kwargs(model, c)).logits[:, -1] for c in srcs])
        assert calls  # the question (several tokens) is attended row by row too
        tokn = a.argmax(-1)
        la = model(input_ids=tokn[:, None], **cache_kwargs(model, merged)).logits[:, -1]
        lb = model(input_ids=tokn[:, None], **cache_kwargs(model, masked)).logits[:, -1]
        lc = torch.cat([model(input_ids=tokn[i : i + 1, None], **cache_kwargs(model, c)).logits[:, -1]
                        for i, c in enumerate(srcs)])
        assert calls and torch.allclose(a, b, atol=1e-5) and torch.allclose(a, alone, atol=1e-5)
        assert torch.allclose(la, lb, atol=1e-5) and torch.allclose(la, lc, atol=1e-5)
        # idle rows: skipped, and the live rows get exactly the logits they get with every row attended
        twin = merge_caches(model, caches(), room=len(q) + 4)
        model(input_ids=ids, **cache_kwargs(model, twin))
        model(input_ids=tokn[:, None], **cache_kwargs(model, twin))
        nxt = la.argmax(-1)[:, None]
        full = model(input_ids=nxt, **cache_kwargs(model, merged)).logits[:, -1]
        twin.idle_rows = frozenset({0, 2})
        part = model(input_ids=nxt, **cache_kwargs(model, twin)).logits[:, -1]
        live = [i for i in range(len(pairs)) if i not in (0, 2)]
        assert torch.equal(full[live], part[live]) and not torch.equal(full[0], part[0])
    # any change of which slots are held ends the runs (a batch operation here)
    merged.batch_select_indices(torch.tensor([0, 1]))
    assert merged.layers[0].row_runs() is None


def test_greedy_decode_batch_clears_idle_rows(tiny):
    model, tok = tiny
    s = build_samples(tok, "passkey", TaskConfig(length=320, samples=1))[0]
    ctx, q = split_prompt(tok, s.context, s.question, s.answer_prefix)
    rec = record_prefill(model, torch.tensor([ctx]))
    pairs = make_pairs(["snapkv", "tova"], [0.3, 0.85])
    merged = merge_caches(model, [rec.compress(model, p.method) for p in pairs], room=len(q) + 8)
    from kvsqueeze.runtime.generate import answer_tokens

    answer_tokens(model, merged, torch.tensor([q] * len(pairs)), 8, _eos_ids(model, tok))
    assert merged.idle_rows == frozenset()
