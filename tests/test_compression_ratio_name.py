"""`compression_ratio` (kvpress's name: the fraction of tokens removed) replaced `ratio` everywhere (issue 10):
the old Python argument gets one clear error, the old CLI spellings stay accepted aliases, and results stores
written with the old column name `ratio` are renamed on open and keep their keys (resume, report, compare)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import kvsqueeze as kq
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation.recommend import read_config
from kvsqueeze.evaluation.store import KEY, ResultStore, renamed_params_json
from kvsqueeze.evaluation.sweep import make_pairs

ROOT = Path(__file__).resolve().parent.parent

# the schema of a store written before issue 10: the key column is `ratio`
OLD_SCHEMA = ("CREATE TABLE results (id INTEGER PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL, "
              "params_json TEXT NOT NULL, ratio REAL NOT NULL, task TEXT NOT NULL, sample_id TEXT NOT NULL, "
              "seed INTEGER NOT NULL, code_version TEXT NOT NULL, metric TEXT, score REAL, prediction TEXT, "
              "kv_bytes INTEGER, full_kv_bytes INTEGER, n_context_tokens INTEGER, meta_json TEXT, created_at REAL, "
              "UNIQUE (model, method, params_json, ratio, task, sample_id, seed, code_version))")


def _old_params(name: str, r: float) -> str:
    """params_json as the old code wrote it for `name` at compression_ratio r: the nested scorer's key was "ratio"."""
    new = json.loads(make_pairs([name], [r])[0].params_json)
    text = json.dumps(new, sort_keys=True).replace('"compression_ratio"', '"ratio"')
    return json.dumps(json.loads(text), sort_keys=True)


def _old_store(path: Path, rows: list[tuple]) -> None:
    con = sqlite3.connect(path)
    con.execute(OLD_SCHEMA)
    for method, pj, r, score in rows:
        con.execute("INSERT INTO results (model, method, params_json, ratio, task, sample_id, seed, code_version, "
                    "metric, score, prediction, kv_bytes, full_kv_bytes, n_context_tokens, created_at) VALUES "
                    "('m', ?, ?, ?, 'passkey', 's0', 0, 'v', 'string_match_all', ?, 'x', 500, 1000, 100, 1.0)",
                    (method, pj, r, score))
    con.commit()
    con.close()


# --- Python API -------------------------------------------------------------------------------------------------
def test_get_method_takes_compression_ratio_and_names_it_for_the_old_argument():
    m = kq.get_method("snapkv", compression_ratio=0.5)
    assert m.compression_ratio == 0.5 and m.n_keep(100, 0, 2) == 50
    assert m.describe() == "snapkv(compression_ratio=0.5)"
    with pytest.raises(KVSqueezeError, match=r"renamed `compression_ratio`.*compression_ratio=0\.5"):
        kq.get_method("snapkv", ratio=0.5)
    with pytest.raises(TypeError):  # direct dataclass construction: Python's own error is enough
        kq.methods.SnapKV(ratio=0.5)


def test_wrappers_pass_compression_ratio_to_their_scorer():
    ada = kq.get_method("adakv:tova", compression_ratio=0.75)
    assert ada.scorer.compression_ratio == 0.75
    assert kq.methods.MiKV(inner=kq.methods.H2O(compression_ratio=0.6)).compression_ratio == 0.6


# --- CLI -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [["--compression-ratio", "0.25"], ["--ratio", "0.25"]])
def test_generate_takes_compression_ratio_and_the_ratio_alias(argv, tmp_path):
    from kvsqueeze.cli.main import main

    ctx_file = tmp_path / "c.txt"
    ctx_file.write_text("x")
    ctx = main.commands["generate"].make_context(
        "generate", ["--context-file", str(ctx_file), "--question", "q", *argv])
    assert ctx.params["compression_ratio"] == 0.25 and "ratio" not in ctx.params


@pytest.mark.parametrize("command", ["sweep", "recommend"])
@pytest.mark.parametrize("option", ["--compression-ratios", "--ratios"])
def test_list_commands_take_compression_ratios_and_the_ratios_alias(command, option):
    from kvsqueeze.cli.main import main

    ctx = main.commands[command].make_context(command, ["--model", "m", option, "0.5,0.75"])
    assert ctx.params["compression_ratios"] == "0.5,0.75" and "ratios" not in ctx.params


def test_help_says_fraction_of_tokens_removed():
    from click.testing import CliRunner

    from kvsqueeze.cli.main import main

    out = CliRunner().invoke(main, ["generate", "--help"]).output
    assert "--compression-ratio, --ratio" in out and "Fraction of tokens removed" in out


def test_config_file_with_the_old_key_gets_one_clear_error(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": "m", "method": "knorm", "ratio": 0.5}))
    with pytest.raises(KVSqueezeError, match="`ratio` was renamed `compression_ratio`"):
        read_config(p)
    p.write_text(json.dumps({"model": "m", "method": "knorm", "compression_ratio": 0.5}))
    assert read_config(p)["compression_ratio"] == 0.5


# --- results stores ------------------------------------------------------------------------------------------------
def test_old_store_column_ratio_is_renamed_on_open_and_keeps_its_keys(tmp_path):
    path = tmp_path / "old.sqlite"
    old_pj = _old_params("adakv", 0.5)
    assert '"ratio"' in old_pj  # the nested scorer's key, as the old code wrote it
    knorm_pj = _old_params("knorm", 0.5)
    _old_store(path, [("knorm", knorm_pj, 0.5, 1.0), ("adakv", old_pj, 0.5, 0.0)])
    with ResultStore(path) as st:
        cols = {r[1] for r in st.conn.execute("PRAGMA table_info(results)")}
        assert "compression_ratio" in cols and "ratio" not in cols
        df = st.frame()
        assert list(df.sort_values("id").compression_ratio) == [0.5, 0.5]
        assert list(df.sort_values("id").score) == [1.0, 0.0]
        # the keys a new sweep computes for the same configurations are the ones stored: resume skips them
        new_keys = {("m", p.name, p.params_json, p.compression_ratio, "passkey", "s0", 0, "v")
                    for p in make_pairs(["knorm", "adakv"], [0.5])}
        assert st.done_keys() == new_keys
        # the UNIQUE key holds on the renamed column
        row = dict(zip(KEY, ("m", "knorm", knorm_pj, 0.5, "passkey", "s0", 0, "v")))
        assert not st.add(row)
        assert st.add({**row, "sample_id": "s1"})
    with ResultStore(path) as st:  # opening again: nothing left to migrate
        assert st.count() == 3


def test_renamed_params_json_touches_only_the_old_key():
    assert renamed_params_json('{"name": "knorm"}') == '{"name": "knorm"}'
    assert renamed_params_json("not json") == "not json"
    out = json.loads(renamed_params_json('{"inner": {"name": "h2o", "ratio": 0.5}, "name": "mikv"}'))
    assert out == {"inner": {"name": "h2o", "compression_ratio": 0.5}, "name": "mikv"}


def test_report_reads_an_old_store(tmp_path):
    from kvsqueeze.evaluation.report import load_results

    path = tmp_path / "old.sqlite"
    _old_store(path, [("knorm", "{}", 0.5, 1.0), ("full", '{"name": "full"}', 0.0, 1.0)])
    df = load_results(path)
    assert sorted(df.compression_ratio) == [0.0, 0.5]


def _bench(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_compare_stores_matches_an_old_store_with_a_new_one(tmp_path):
    old, new = tmp_path / "old.sqlite", tmp_path / "new.sqlite"
    _old_store(old, [("knorm", _old_params("knorm", 0.5), 0.5, 1.0), ("adakv", _old_params("adakv", 0.5), 0.5, 0.0)])
    before = old.read_bytes()
    with ResultStore(new) as st:
        for p, score in zip(make_pairs(["knorm", "adakv"], [0.5]), (1.0, 0.0)):
            st.add({"model": "m", "method": p.name, "params_json": p.params_json,
                    "compression_ratio": p.compression_ratio, "task": "passkey", "sample_id": "s0", "seed": 0,
                    "code_version": "w", "metric": "string_match_all", "score": score, "prediction": "x",
                    "kv_bytes": 500, "full_kv_bytes": 1000, "n_context_tokens": 100})
    r = _bench("compare_stores.py", old, new)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "matched: 2;" in r.stdout and "only before: 0; only after: 0" in r.stdout
    assert old.read_bytes() == before  # compared as is, not migrated
    with ResultStore(new) as st:  # a differing score is still caught
        st.conn.execute("UPDATE results SET score = 0.5 WHERE method = 'knorm'")
    assert _bench("compare_stores.py", old, new).returncode == 1


def test_combine_stores_copies_an_old_store(tmp_path):
    old, out = tmp_path / "old.sqlite", tmp_path / "out.sqlite"
    _old_store(old, [("knorm", _old_params("knorm", 0.5), 0.5, 1.0), ("adakv", _old_params("adakv", 0.5), 0.5, 0.0)])
    r = _bench("combine_stores.py", out, old)
    assert r.returncode == 0, r.stdout + r.stderr
    with ResultStore(out, create=False) as st:
        df = st.frame()
    assert sorted(df.method) == ["adakv", "knorm"] and list(df.compression_ratio) == [0.5, 0.5]
    assert set(df.params_json) == {p.params_json for p in make_pairs(["knorm", "adakv"], [0.5])}


def test_combine_stores_union_keeps_samples_one_source_lacks(tmp_path):
    """Default: only samples complete in every source; --union: every row of every source."""
    def store(path, samples):
        with ResultStore(path) as st:
            for sid in samples:
                st.add({"model": "m", "method": "knorm", "params_json": "{}", "compression_ratio": 0.5,
                        "task": "passkey", "sample_id": sid, "seed": 0, "code_version": "w",
                        "metric": "string_match_all", "score": 1.0, "prediction": "x", "kv_bytes": 500,
                        "full_kv_bytes": 1000, "n_context_tokens": 100})
    a, b = tmp_path / "a.sqlite", tmp_path / "b.sqlite"
    store(a, ["s0", "s1"])
    store(b, ["s0"])
    for flag, want in ((), {"s0"}), (("--union",), {"s0", "s1"}):
        out = tmp_path / f"out{len(flag)}.sqlite"
        r = _bench("combine_stores.py", *flag, out, a, b)
        assert r.returncode == 0, r.stdout + r.stderr
        with ResultStore(out, create=False) as st:
            assert set(st.frame().sample_id) == want
