"""Decode-time selection (issue 4): Quest and AttentionPredictor on tiny random Llamas."""

import math
from dataclasses import asdict

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest, load_predictor, recovery, save_predictor
from kvsqueeze.selection.attention_predictor import IncrementalCNN, n_parameters
from kvsqueeze.selection.base import page_pool, pages_to_slots
from kvsqueeze.selection.quest import page_minmax, page_scores
from kvsqueeze.training.predictor import TrainConfig, collect_traces, recovery_at, train

from conftest import Spy, kv, tiny_llama
from offload_helpers import predictor_net as _net


@torch.no_grad()
def _decode(model, selector, ids, steps=20):
    cache = kq.CompressedCache(model, selector=selector)
    logits = kq.prefill(model, cache, ids)
    out, tok = [], int(logits.argmax())
    for _ in range(steps):
        lg = model(input_ids=torch.tensor([[tok]]), **kv(cache), use_cache=True).logits[0, -1]
        out.append(lg)
        tok = int(lg.argmax())
    return torch.stack(out)


def test_predictor_has_the_papers_4833_parameters():
    assert n_parameters(PredictorNet()) == 4833
    out = PredictorNet()(torch.rand(5, 64, 37))  # fully convolutional over pages, any history length
    assert out.shape == (5, 37)
    assert PredictorNet()(torch.rand(2, 7, 11)).shape == (2, 11)


def test_blend_initialisation_is_exactly_the_heuristic():
    net = PredictorNet().init_blend(0.75, noise=0.0)
    x = torch.rand(4, 64, 21)
    assert torch.allclose(net(x), 0.25 * x.mean(1) + 0.75 * x[:, -1], atol=1e-5)
    assert torch.allclose(PredictorNet().init_history_mean(noise=0.0)(x), x.mean(1), atol=1e-5)


def test_recovery_rate_on_a_hand_made_case():
    # 2 query heads share 1 kv head; slots 0 and 2 attended
    probs = torch.tensor([[[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    idx = torch.tensor([[[0, 2]]])
    assert recovery(probs, idx)[0].tolist() == pytest.approx([0.7, 0.2])
    # page level (training's metric): sink page 0, local page 3, top-1 of the middle pages 1..2
    sums = torch.tensor([[0.1, 0.3, 0.2, 0.4]])
    assert float(recovery_at(torch.tensor([[0.0, 1.0]]), sums, 1, 3, 1)) == pytest.approx(0.7)  # picks page 2
    assert float(recovery_at(torch.tensor([[1.0, 0.0]]), sums, 1, 3, 1)) == pytest.approx(0.8)  # picks page 1


def test_page_pool_and_slots():
    rows = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    assert page_pool(rows, 2).tolist() == [[3.0, 5.0, 4.0]]
    assert page_pool(rows, 2, "sum").tolist() == [[4.0, 7.0, 4.0]]
    slots = pages_to_slots(torch.tensor([[[2, 0]]]), 5, 2)  # page 2 is partial (slot 4 only)
    assert slots.tolist() == [[[0, 1, 4]]]


def test_quest_page_score_upper_bounds_every_key_of_its_page():
    torch.manual_seed(0)
    keys = torch.randn(2, 3, 64, 16)
    query = torch.randn(2, 6, 16)  # 2 query heads per kv head
    kmin, kmax = page_minmax(keys, 16)
    scores = page_scores(query, kmin, kmax)  # (2, 6, 4)
    qk = torch.einsum("bhd,bhnd->bhn", query, keys.repeat_interleave(2, dim=1)).view(2, 6, 4, 16)
    assert (scores[..., None] >= qk - 1e-5).all()
    # a one-key page: the bound is exact
    one = page_scores(query, keys[:, :, :1], keys[:, :, :1])[..., 0]
    assert torch.allclose(one, qk[..., 0, 0], atol=1e-5)


@pytest.mark.parametrize("kind", ["quest", "ap"])
def test_selector_returns_the_required_slots_within_budget(kind):
    model = tiny_llama(layers=4)
    budget = 96
    sel = Quest(budget) if kind == "quest" else AttentionPredictor(budget, predictor=_net(), sink=16, local=32)
    spy = Spy(sel)
    ids = torch.randint(0, 101, (1, 250))
    _decode(model, spy, ids, steps=12)
    sparse = [(li, n, idx) for li, n, idx in spy.calls if idx is not None]
    assert {li for li, _, idx in spy.calls if idx is None} == {0, 1}  # dense layers
    assert sparse and {li for li, _, _ in sparse} == {2, 3}
    for li, n, idx in sparse:
        assert idx.shape[:2] == (1, 2)  # one subset per kv head: shared by its GQA group
        assert idx.shape[-1] <= budget
        assert bool((idx[..., -1] == n - 1).all())  # the current token
        assert bool((idx.diff(dim=-1) > 0).all()) and int(idx.min()) >= 0
        last_page = torch.arange((n - 1) // 16 * 16, n)
        for h in range(2):
            s = set(idx[0, h].tolist())
            assert s.issuperset(last_page.tolist())
            if kind == "ap":
                assert s.issuperset(range(16))  # sink
                assert s.issuperset(range((math.ceil(n / 16) - 2) * 16, n))  # local: the last 2 pages
        # every head attends to the same number of slots: whole pages, only the last one partial
        assert idx.shape[-1] % 16 == n % 16 or n % 16 == 0


@pytest.mark.parametrize("kind", ["quest", "ap"])
def test_budget_not_below_context_is_dense_decoding(kind):
    model = tiny_llama(layers=4)
    ids = torch.randint(0, 101, (1, 120))
    dense = _decode(model, None, ids)
    sel = Quest(512) if kind == "quest" else AttentionPredictor(512, predictor=_net())
    spy = Spy(sel)
    out = _decode(model, spy, ids)
    assert all(idx is None for _, _, idx in spy.calls)
    assert torch.allclose(out, dense, atol=1e-5)


def test_sparse_decoding_matches_a_masked_dense_reference():
    """The selector's slots, attended through the gather, equal eager attention with the other slots masked."""
    model = tiny_llama(layers=4, attn="eager")
    ids = torch.randint(0, 101, (1, 200))
    sel = Quest(64, track_recovery=True)
    spy = Spy(sel)
    out = _decode(model, spy, ids, steps=3)
    rec = sel.recovery_by_layer()
    assert set(rec) == {2, 3} and all(0 < r <= 1 for r in rec.values())

    picks = {(li, n): idx for li, n, idx in spy.calls}

    class Replay:  # dense attention restricted by a mask built from the recorded slots
        def setup(self, model):
            pass

        def select(self, layer_idx, layer, query):
            return picks[(layer_idx, layer.n_stored)]

    ref = _decode(model, Replay(), ids, steps=3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_attention_predictor_history_and_calibration_rows():
    model = tiny_llama(layers=4)
    sel = AttentionPredictor(96, predictor=_net(), sink=16, local=32, track_recovery=True)
    ids = torch.randint(0, 101, (1, 250))
    cache = kq.CompressedCache(model, selector=sel)
    kq.prefill(model, cache, ids)
    hist = sel.state[2]["hist"]
    assert hist.shape == (1, 4, 64, math.ceil(250 / 16))  # the prompt's last 64 queries, per query head
    assert 0 not in sel.state or "hist" not in sel.state[0]  # dense layers keep no history
    tok = torch.tensor([[1]])
    rows = []
    for _ in range(10):
        model(input_ids=tok, **kv(cache), use_cache=True)
        rows.append(sel.state[2]["hist"][0, :, -1])
    # sparse rows are zero on pages not attended; every 5th row is a full (calibration) row
    n_zero = [int((r == 0).sum()) for r in rows]
    assert n_zero[4] == 0 and n_zero[9] == 0
    assert all(z > 0 for i, z in enumerate(n_zero) if i not in (4, 9))
    assert sel.state[2]["hist"].shape[2] == 64
    assert set(sel.recovery_by_layer()) == {2, 3}


def test_incremental_cnn_equals_the_full_cnn():
    torch.manual_seed(1)
    net = _net(1)
    sel = AttentionPredictor(256, predictor=net, sink=32, local=32)
    sel._incremental = IncrementalCNN(net)
    st, n = {}, 600
    sel._push(st, torch.rand(1, 3, 60, math.ceil(n / 16)))
    for _ in range(40):  # history fills up to 64 rows, then slides; new pages appear every 16 steps
        n += 1
        n_pages = math.ceil(n / 16)
        full = sel.predict(st["hist"], n_pages, None)
        inc = sel.predict(st["hist"], n_pages, st)
        assert torch.allclose(full, inc, atol=1e-4)
        sel._push(st, torch.rand(1, 3, 1, n_pages) * (torch.rand(1, 3, 1, n_pages) < 0.3))


def test_checkpoint_round_trip(tmp_path):
    net = _net(2)
    path = save_predictor(net, tmp_path / "p.safetensors", {"best_epoch": 3})
    back, meta = load_predictor(path)
    x = torch.rand(3, 64, 20)
    assert torch.equal(net(x), back(x)) and meta == {"best_epoch": 3}
    with pytest.raises(kq.KVSqueezeError, match="no attention predictor"):
        load_predictor(tmp_path / "missing.safetensors")


def test_checkpoint_written_before_the_page_rename_still_loads(tmp_path):
    """Checkpoints trained before `block` became `page` store config["block"]: read as config["page"]; new
    checkpoints store `page`."""
    import json

    from safetensors.torch import save_file

    net = _net(3)
    old = tmp_path / "old.safetensors"
    tensors = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    old_meta = {"best_epoch": 1, "config": {"block": 16, "sink": 64}}  # as TrainConfig's asdict wrote it
    save_file(tensors, str(old), metadata={"kvsqueeze": json.dumps(old_meta)})
    back, meta = load_predictor(old)
    x = torch.rand(2, 64, 12)
    assert torch.equal(net(x), back(x))
    assert meta["config"] == {"page": 16, "sink": 64}
    new = save_predictor(back, tmp_path / "new.safetensors", {"config": asdict(TrainConfig(page=32))})
    assert load_predictor(new)[1]["config"]["page"] == 32 and "block" not in load_predictor(new)[1]["config"]
    sel = AttentionPredictor(256, predictor=old, sink=32, local=32)  # an old checkpoint drives the selector
    _decode(tiny_llama(layers=4), sel, torch.randint(0, 101, (1, 300), generator=torch.Generator().manual_seed(0)),
            steps=3)
    assert sel.predictor_meta["config"]["page"] == 16


def test_missing_predictor_says_how_to_train_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    with pytest.raises(kq.KVSqueezeError, match="train-predictor"):
        kq.CompressedCache(tiny_llama(layers=4), selector=AttentionPredictor(256))


def test_tiny_end_to_end_training_then_decoding(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    model = tiny_llama(layers=4)
    g = torch.Generator().manual_seed(0)
    seqs = [("text", torch.randint(0, 101, (260,), generator=g).tolist()) for _ in range(3)]
    traces = collect_traces(model, seqs, steps=8, progress=False)
    assert traces[0].maxp.shape == (2, 4, 72, math.ceil(260 / 16))  # layers 2-3, 4 query heads, H + S rows
    assert torch.allclose(traces[0].sums[:, :, -1].float().sum(-1), torch.ones(2, 4), atol=1e-2)
    cfg = TrainConfig(epochs=2, sink=16, local=16, val_k=(2,), select_k=2, series_per_batch=4, crop=6,
                      select_budget=64, val_every=None)
    res = train(traces[:2], traces[2:], cfg, progress=False)
    assert 0 <= res.best_epoch <= 2 and len(res.history) == 3
    assert set(res.val_recovery) == {"learned", "last", "mean"}
    from kvsqueeze.selection import predictor_path

    path = save_predictor(res.net, predictor_path(model), res.meta())
    sel = AttentionPredictor(64, sink=16, local=16)  # loads the checkpoint from $KVSQUEEZE_CACHE
    out = _decode(model, sel, torch.randint(0, 101, (1, 150), generator=g), steps=5)
    assert torch.isfinite(out).all() and sel.predictor_meta["best_epoch"] == res.best_epoch
    assert path.exists()


def test_cli_train_predictor_bad_text_dir(tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    res = CliRunner().invoke(main, ["train-predictor", "--text-dir", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "error:" in res.output
