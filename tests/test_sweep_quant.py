"""Sweeps over storage (--quant) and decode-time selection (--select), 16-bit-normalised bytes, the Pareto
frontier and error bars, on a tiny random Llama (fast).

What is checked: every configuration of a sample comes from one shared prefill and answers exactly as its own
prefill would; rows get distinct keys, plain configurations keep their old keys, a rerun adds nothing; old
result files gain the new columns without losing their keys; kv_bytes_16 follows its rule; the frontier is exactly
the non-dominated set; one sample's step and bootstrap intervals show up in the tables; bad input is one error
line.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import torch

import kvsqueeze as kq

from conftest import assert_one_error_line, loaded_in_own_cache, save_tiny_llama_with_smollm2_tokenizer
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation import ResultStore, make_pairs, run_sweep
from kvsqueeze.evaluation.frontier import frontier, frontier_tables, pareto_mask
from kvsqueeze.evaluation.sizes import bytes_16
from kvsqueeze.evaluation.store import KEY
from kvsqueeze.tasks import TaskConfig, build_samples


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer (answers depend on the cache)."""
    d = save_tiny_llama_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-llama-q"))
    with loaded_in_own_cache(d, tmp_path_factory.mktemp("kvs-cache-q")) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def samples(tiny):
    _, tok = tiny
    out = build_samples(tok, "passkey", TaskConfig(length=320, samples=2))
    for s in out:
        s.max_new_tokens = 6
    return out


def test_quant_sweep_shares_one_prefill_keys_bytes_and_resume(tiny, samples, tmp_path, monkeypatch):
    import kvsqueeze.evaluation.sweep as sweep_mod

    model, tok = tiny
    calls = []
    real = sweep_mod.record_prefill
    monkeypatch.setattr(sweep_mod, "record_prefill", lambda *a, **k: calls.append(1) or real(*a, **k))
    pairs = make_pairs(["tova", "knorm"], [0.5], quants=["none", "kivi-4"])
    assert len(pairs) == 4 and sorted(p.quant or "none" for p in pairs) == ["kivi-4", "kivi-4", "none", "none"]
    # plain configurations keep exactly the keys they had before --quant existed
    plain = {(p.name, p.params_json, p.compression_ratio) for p in make_pairs(["tova", "knorm"], [0.5])}
    assert plain == {(p.name, p.params_json, p.compression_ratio) for p in pairs if p.quant is None}
    with ResultStore(tmp_path / "q.sqlite") as st:
        r = run_sweep(model, tok, samples, pairs, st, model_name="tiny", progress=False, code_version="v")
        assert r.added == 8 and r.prefills == len(samples) == len(calls)  # one shared prefill per sample
        df = st.frame()
        assert len(df) == 8 and len({tuple(r) for r in df[list(KEY)].to_numpy().tolist()}) == 8
        assert set(df.quant.fillna("none")) == {"none", "kivi-4"}
        assert df["select"].isna().all() and df.kv_bytes_16.gt(0).all()
        assert (df.kv_bytes_16 < df.full_kv_bytes_16).all()  # every configuration here compresses
        q = df[df.quant == "kivi-4"].set_index(["method", "sample_id"])
        p = df[df.quant.isna()].set_index(["method", "sample_id"])
        assert (q.kv_bytes_16 < p.kv_bytes_16).all()  # 4-bit storage of the same kept tokens is smaller
        # fp32 model: unquantized bytes as measured are twice the 16-bit ones
        assert (p.kv_bytes == 2 * p.kv_bytes_16).all() and (df.full_kv_bytes == 2 * df.full_kv_bytes_16).all()
        r2 = run_sweep(model, tok, samples, pairs, st, model_name="tiny", progress=False, code_version="v")
        assert (r2.added, r2.skipped, r2.prefills) == (0, 8, 0)
        assert st.count() == 8


@pytest.mark.parametrize("quants, selects", [(["kivi-4", "mikv-8-2"], None), (["none"], [("quest", 64)]),
                                             (["kivi-4"], [("attention_predictor", 64)])])
def test_quantized_and_selected_shared_prefill_answers_as_its_own_prefill(tiny, samples, quants, selects):
    """The shared record replays the prefill to the selector (AttentionPredictor's history) and quantizes the
    kept tokens exactly as a prefill with that storage would: the answers are those of a fresh prefill."""
    from kvsqueeze.selection import AttentionPredictor, PredictorNet

    model, tok = tiny
    pairs = make_pairs(["full", "snapkv"], [0.5], quants=quants, selects=selects)
    for p in pairs:
        if p.select == "attention_predictor":  # an untrained-but-deterministic CNN (no checkpoint needed)
            p.selector = AttentionPredictor(64, predictor=PredictorNet().init_blend())
    shared = run_sweep(model, tok, samples, pairs, None, model_name="t", progress=False, code_version="t",
                       keep_answers=True)
    fresh = run_sweep(model, tok, samples, pairs, None, model_name="t", progress=False, code_version="t",
                      keep_answers=True, share_prefill=False)
    assert shared.prefills == len(samples) and fresh.prefills == 0
    assert shared.answers == fresh.answers
    assert len(set(shared.answers.values())) > 1  # the configurations do answer differently


def test_old_store_gains_the_new_columns_and_keeps_its_keys(tmp_path):
    path = tmp_path / "old.sqlite"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL, "
                "params_json TEXT NOT NULL, ratio REAL NOT NULL, task TEXT NOT NULL, sample_id TEXT NOT NULL, "
                "seed INTEGER NOT NULL, code_version TEXT NOT NULL, metric TEXT, score REAL, kv_bytes INTEGER, "
                "full_kv_bytes INTEGER, created_at REAL, UNIQUE (model, method, params_json, ratio, task, "
                "sample_id, seed, code_version))")
    con.execute("INSERT INTO results (model, method, params_json, ratio, task, sample_id, seed, code_version, "
                "metric, score, kv_bytes, full_kv_bytes) VALUES ('m', 'knorm', '{}', 0.5, 'passkey', 's0', 0, 'v', "
                "'string_match_all', 1.0, 500, 1000)")
    con.commit()
    con.close()
    with ResultStore(path) as st:
        keys = st.done_keys()
        assert keys == {("m", "knorm", "{}", 0.5, "passkey", "s0", 0, "v")}
        df = st.frame()
        assert {"quant", "select", "select_budget", "kv_bytes_16", "full_kv_bytes_16"} <= set(df.columns)
        assert df.quant.isna().all()
        assert st.add({"model": "m", "method": "knorm", "params_json": '{"quant": "kivi-4"}', "compression_ratio": 0.5,
                       "task": "passkey", "sample_id": "s0", "seed": 0, "code_version": "v", "quant": "kivi-4",
                       "select": None, "kv_bytes_16": 100, "full_kv_bytes_16": 500})
        assert not st.add({"model": "m", "method": "knorm", "params_json": "{}", "compression_ratio": 0.5, "task": "passkey",
                           "sample_id": "s0", "seed": 0, "code_version": "v"})  # the old key still holds
    with ResultStore(path) as st:  # opening again: nothing to migrate
        assert st.count() == 2


def test_bytes_16_rule(tiny):
    from kvsqueeze.runtime.generate import record_prefill
    from kvsqueeze.quant import parse_quant

    model, _ = tiny
    ids = torch.randint(0, 1000, (1, 200))
    rec = record_prefill(model, ids)
    kv16, full16 = bytes_16(rec.cache)
    cfg = model.config
    d = cfg.hidden_size // cfg.num_attention_heads
    assert full16 == kv16 == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * 200 * 2
    q = parse_quant("kivi-4")
    cache = rec.compress(model, kq.get_method("knorm", compression_ratio=0.5), q.layer_factory)
    kv16q, full16q = bytes_16(cache)
    assert full16q == full16
    expected = 0
    for layer in cache.layers:
        for t in layer.kv_tensors().values():
            expected += t.numel() * (2 if t.is_floating_point() else t.element_size())
    assert kv16q == expected < full16 / 2
    # the residual window (full precision, fp32 here) counts 2 bytes an element; codes their real uint8 bytes
    assert cache.stats().kv_bytes > kv16q


def test_untrained_predictor_is_a_clear_error(tiny, samples):
    model, tok = tiny
    pairs = make_pairs(["knorm"], [0.5], selects=[("attention_predictor", 64)])
    with pytest.raises(KVSqueezeError, match="train-predictor"):
        run_sweep(model, tok, samples, pairs, None, model_name="t", progress=False, code_version="t")


# --- the frontier -------------------------------------------------------------------------------------------
def _store(path, points, tasks=("passkey", "niah"), n=4):
    """points: (method, params, compression_ratio, kv16, {task: [scores]} or one list for every task)."""
    st = ResultStore(path)
    for method, params, compression_ratio, kv16, scores in points:
        for task in tasks:
            vals = scores[task] if isinstance(scores, dict) else scores
            if vals is None:
                continue
            for i, v in enumerate(vals[:n]):
                st.add({"model": "m", "method": method, "params_json": json.dumps(params, sort_keys=True),
                        "compression_ratio": compression_ratio, "task": task, "sample_id": f"s{i}", "seed": 0, "code_version": "v",
                        "metric": "string_match_all", "score": float(v), "kv_bytes": 2 * kv16,
                        "full_kv_bytes": 2000, "kv_bytes_16": kv16, "full_kv_bytes_16": 1000,
                        "quant": params.get("quant"), "select": params.get("select"),
                        "select_budget": params.get("select_budget")})
    st.close()
    return path


def test_frontier_is_exactly_the_pareto_points(tmp_path):
    from kvsqueeze.evaluation.report import load_results

    db = _store(tmp_path / "f.sqlite", [
        ("full", {"name": "full"}, 0.0, 1000, [1, 1, 1, 1]),                         # 1x, 1.0: frontier
        ("tova", {"name": "tova"}, 0.5, 500, [1, 1, 1, 0]),                          # 2x, .75: frontier
        ("knorm", {"name": "knorm"}, 0.5, 500, [1, 0, 0, 0]),                        # 2x, .25: dominated by tova
        ("tova", {"name": "tova", "quant": "kivi-4"}, 0.5, 150, [1, 1, 0, 0]),       # 6.7x, .5: frontier
        ("knorm", {"name": "knorm", "quant": "kivi-4"}, 0.75, 100, [0, 0, 0, 0]),   # 10x, 0: frontier (smallest)
        ("tova", {"name": "tova", "quant": "kivi-2"}, 0.5, 120, [1, 0, 0, 0]),       # 8.3x, .25: frontier
        ("knorm", {"name": "knorm", "select": "quest", "select_budget": 64}, 0.5, 500,
         {"passkey": [1, 1, 0, 0], "niah": None}),                                   # one task only
    ])
    df = load_results(db)
    pts = frontier(df)
    ov = pts[pts.task == "overall"]
    assert "knorm + quest@64" not in set(ov.label)  # not measured on every task: not in the overall mean
    on = {(l, r) for l, r in zip(ov[ov.on_frontier].label, ov[ov.on_frontier].compression_ratio)}
    assert on == {("full", 0.0), ("tova", 0.5), ("tova + kivi-4", 0.5), ("tova + kivi-2", 0.5),
                  ("knorm + kivi-4", 0.75)}
    pk = pts[pts.task == "passkey"].set_index(["label", "compression_ratio"])
    assert not pk.loc[("knorm", 0.5), "on_frontier"]
    assert not pk.loc[("knorm + quest@64", 0.5), "on_frontier"]  # 2x at .5: tova's 2x at .75 dominates it
    assert pk.loc[("knorm + quest@64", 0.5), "attends"] == 64
    assert pk.loc[("tova + kivi-4", 0.5), "factor"] == pytest.approx(1000 / 150)
    assert pk.loc[("tova", 0.5), "step"] == pytest.approx(0.25) and pk.loc[("tova", 0.5), "n"] == 4
    assert ov.set_index(["label", "compression_ratio"]).loc[("tova", 0.5), "step"] == pytest.approx(1 / 8)
    tables = dict(frontier_tables(frontier(df, bootstrap=200)))
    head = next(h for h in tables if "/ overall" in h)
    assert "5 of 6 configurations" in head
    t = tables[head]
    assert list(t.configuration) == ["knorm @0.75 + kivi-4", "tova @0.5 + kivi-2", "tova @0.5 + kivi-4",
                                     "tova @0.5", "full"]
    assert "95% bootstrap" in t.columns and t["+-1 sample"].iloc[0] == "0.125"


def test_pareto_mask_ties_and_lower_is_better():
    assert pareto_mask([1, 2, 2, 3], [1.0, 0.5, 0.5, 0.1]).tolist() == [True, True, True, True]
    assert pareto_mask([1, 2, 3], [0.2, 0.5, 0.5]).tolist() == [False, False, True]
    assert pareto_mask([1, 2, 3], [10.0, 12.0, 11.0], higher_is_better=False).tolist() == [True, False, True]


def test_frontier_command_and_errors(tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    def one_error(args, message):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2, r.output
        lines = [l for l in r.output.strip().splitlines() if l]
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output

    one_error(["frontier", str(tmp_path / "missing.sqlite")], "results file not found")
    ResultStore(tmp_path / "empty.sqlite").close()
    one_error(["frontier", str(tmp_path / "empty.sqlite")], "holds no results yet")
    db = _store(tmp_path / "f.sqlite", [("full", {"name": "full"}, 0.0, 1000, [1, 1]),
                                        ("tova", {"name": "tova"}, 0.5, 500, [1, 0])], n=2)
    one_error(["frontier", str(db), "--task", "nope"], "no results for task 'nope'")
    one_error(["frontier", str(db), "--metric", "nope"], "no row has the metric 'nope'")
    r = CliRunner().invoke(main, ["frontier", str(db), "--task", "passkey"])
    assert r.exit_code == 0, r.output
    assert "m / passkey (string_match_all): 2 of 2 configurations on the frontier" in r.output
    assert "tova @0.5" in r.output and "2.00x" in r.output and "0.500" in r.output


def test_tables_state_n_and_one_sample_step(tmp_path):
    from kvsqueeze.evaluation.report import load_results, markdown_table, score_table
    from kvsqueeze.evaluation.store import error_notes, summary_table

    db = _store(tmp_path / "f.sqlite", [("full", {"name": "full"}, 0.0, 1000, [1, 1, 1, 1]),
                                        ("tova", {"name": "tova"}, 0.5, 500, [1, 0, 1, 0]),
                                        ("tova", {"name": "tova", "quant": "kivi-4"}, 0.5, 150, [1, 0, 0, 0])])
    df = load_results(db)
    assert error_notes(df) == ["samples per cell: niah n=4 (one sample moves a cell by 0.25); "
                               "passkey n=4 (one sample moves a cell by 0.25)"]
    t = summary_table(df)
    assert len(t) == 3 and list(t.index.names) == ["method", "compression_ratio", "quant"]  # quant configurations apart
    # offloaded rows apart too (fresh-user report, thirteenth session: the table could not tell them apart)
    db2 = _store(tmp_path / "g.sqlite", [("tova", {"name": "tova", "quant": "kivi-2"}, 0.5, 150, [1, 0, 1, 0]),
                                         ("tova", {"name": "tova", "quant": "kivi-2", "offload": "cpu"}, 0.5, 150,
                                          [1, 0, 1, 1])])
    t2 = summary_table(load_results(db2))
    assert list(t2.index.names) == ["method", "compression_ratio", "quant", "offload"] and len(t2) == 2
    assert ("tova", 0.5, "kivi-2", "cpu") in t2.index and ("tova", 0.5, "kivi-2", "-") in t2.index
    md = markdown_table(df, bootstrap=300).splitlines()
    assert "passkey (n=4, 1 sample = 0.25)" in md[0]
    row = next(l for l in md if l.startswith("| tova + kivi-4 |"))
    assert "0.25 [0.00, 0.75]" in row and "15.0%" in row
    html_t = score_table(df, bootstrap=100)
    assert any("1 sample = 0.25" in c for c in html_t.columns)


@pytest.mark.parametrize("args, message", [
    (["sweep", "--quant", "none,kivi-3"], "3 bits is not supported"),
    (["sweep", "--quant", "lol-4"], "unknown --quant scheme"),
    (["sweep", "--select", "quest,bogus"], "unknown --select 'bogus'"),
    (["eval", "--select", "quest", "--select-budget", "16"], "--select-budget must be integers >= 32"),
])
def test_bad_quant_and_select_are_one_error_line(args, message, tmp_path):
    assert_one_error_line(args + ["--results", str(tmp_path / "x.sqlite")], message)
