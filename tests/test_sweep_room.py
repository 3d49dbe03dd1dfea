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
