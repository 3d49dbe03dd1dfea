"""The sweep engine, the results store and the eval / sweep commands, on a tiny random Llama (fast).

What is checked: one shared prefill gives the same answers (and the same capped perplexity) as re-running the prefill
for every (method, compression_ratio) pair, batched or not; methods that compress while decoding fall back; rows are
keyed, never duplicated, and a sweep killed with SIGKILL resumes without recomputing or losing finished rows; bad
input is one `error:` line and exit status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

import kvsqueeze as kq

from conftest import loaded_in_own_cache
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation import ResultStore, make_pairs, method_params, run_sweep
from kvsqueeze.evaluation.sweep import capped_method, capped_perplexity
from kvsqueeze.runtime.generate import generate_answer, record_prefill
from kvsqueeze.tasks import Sample, TaskConfig, build_samples

ALL = ["full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "random", "qfilters"]


@pytest.fixture(scope="module")
def tiny(tiny_dir, tmp_path_factory):
    with loaded_in_own_cache(tiny_dir, tmp_path_factory.mktemp("kvs-cache")) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def samples(tiny):
    _, tok = tiny
    out = build_samples(tok, "passkey,niah_multivalue", TaskConfig(length=320, samples=2))
    for s in out:
        s.max_new_tokens = 6  # short answers keep the test fast
    return out


def test_shared_prefill_gives_the_answers_of_re_prefilling(tiny, samples):
    model, tok = tiny
    pairs = make_pairs(ALL, [0.5, 0.8])
    assert len(pairs) == 1 + 8 * 2  # full runs once
    ref = run_sweep(model, tok, samples, pairs, None, model_name="tiny", share_prefill=False, progress=False,
                    keep_answers=True, code_version="t")
    for bs in (1, 8, 32):
        got = run_sweep(model, tok, samples, pairs, None, model_name="tiny", progress=False, keep_answers=True,
                        code_version="t", batch_size=bs)
        assert got.prefills == len(samples)
        assert got.answers == ref.answers
    assert ref.prefills == 0 and len(ref.answers) == len(pairs) * len(samples)
    # the answers do depend on the method: the test would see a mix-up between pairs
    assert len({v for k, v in ref.answers.items()}) > 3


def test_sharing_with_sliding_window_layers(tiny):
    """Gemma 3 mixes sliding-window layers (never compressed) with full ones: batching concatenates the former."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    _, tok = tiny
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=48,
                           layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=4096,
                           initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=0)
    model = Gemma3ForCausalLM(cfg).eval()
    model.set_attn_implementation("sdpa")
    ss = build_samples(tok, "passkey,ppl", TaskConfig(length=300, samples=1, ppl_tokens=8))
    for s in ss:
        s.max_new_tokens = 6
    pairs = make_pairs(["full", "snapkv", "h2o", "pyramidkv", "streaming_llm"], [0.5, 0.8])
    ref = run_sweep(model, tok, ss, pairs, None, model_name="g", share_prefill=False, progress=False,
                    keep_answers=True, code_version="t")
    got = run_sweep(model, tok, ss, pairs, None, model_name="g", progress=False, keep_answers=True,
                    code_version="t")
    assert got.answers == ref.answers and len(set(ref.answers.values())) > 3


def test_query_aware_sharing_matches_generate_answer(tiny, samples):
    model, tok = tiny
    s = samples[0]
    pairs = make_pairs(["snapkv", "tova"], [0.6], query_aware=True)
    got = run_sweep(model, tok, [s], pairs, None, model_name="tiny", progress=False, keep_answers=True,
                    code_version="t")
    for p in pairs:
        g = generate_answer(model, tok, s.context, s.question, p.method, max_new_tokens=s.max_new_tokens,
                            query_aware=True, answer_prefix=s.answer_prefix)
        assert got.answers[(s.task, s.sample_id, p.name, p.params_json, p.compression_ratio)] == g.answer
    assert "query-aware" in pairs[0].params_json


def test_decode_time_methods_and_chunked_prefill_fall_back(tiny, samples, tmp_path):
    model, tok = tiny
    store = ResultStore(tmp_path / "r.sqlite")
    pairs = make_pairs(["snapkv"], [0.5]) + make_pairs(["h2o"], [0.5], compression_interval=1)
    run_sweep(model, tok, samples[:1], pairs, store, model_name="tiny", progress=False, code_version="t")
    df = store.frame().set_index("method")
    assert df.loc["snapkv", "protocol"] == "shared-prefill"
    assert df.loc["h2o", "protocol"] == "re-prefill"
    run_sweep(model, tok, samples[:1], pairs, store, model_name="tiny", progress=False, code_version="t2",
              chunk_size=64)
    assert set(store.frame().query("code_version == 't2'").protocol) == {"re-prefill"}


def test_capped_perplexity_shared_equals_fresh_prefill_and_holds_the_budget(tiny):
    model, tok = tiny
    s = build_samples(tok, "ppl", TaskConfig(length=300, samples=1, ppl_tokens=24))[0]
    ids = tok(s.context).input_ids
    k = 24
    prefix, fed, targets = ids[: len(ids) - k - 1], ids[len(ids) - k - 1 : -1], ids[len(ids) - k :]
    rec = record_prefill(model, torch.tensor([prefix]))
    values = {}
    for name in ("full", "streaming_llm", "h2o", "snapkv", "pyramidkv", "knorm"):
        mm = capped_method(kq.get_method(name, compression_ratio=0.75), len(prefix))
        shared = rec.compress(model, mm)
        fresh = kq.CompressedCache(model, mm)
        kq.prefill(model, fresh, torch.tensor([prefix]))
        a = capped_perplexity(model, shared, fed, targets)
        b = capped_perplexity(model, fresh, fed, targets)
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), name
        values[name] = a
        stored = shared.stats().tokens_stored
        if name == "full":
            assert max(stored) == len(ids) - 1
        else:
            assert mm.budget == int(len(prefix) * 0.25) and mm.compression_interval == 1
            assert max(stored) <= 2 * mm.budget  # pyramid budgets vary by layer around the mean
            assert sum(stored) <= len(stored) * (mm.budget + 1)
    assert len(set(values.values())) > 2


def test_store_keys_resume_and_no_duplicates(tiny, samples, tmp_path):
    model, tok = tiny
    path = tmp_path / "r.sqlite"
    pairs = make_pairs(["full", "snapkv", "knorm"], [0.5, 0.75])
    with ResultStore(path) as st:
        r1 = run_sweep(model, tok, samples[:1], pairs, st, model_name="tiny", progress=False, code_version="v1")
        assert (r1.added, r1.skipped) == (len(pairs), 0)
        first = st.frame()
        r2 = run_sweep(model, tok, samples, pairs, st, model_name="tiny", progress=False, code_version="v1")
        assert (r2.added, r2.skipped) == (len(pairs) * (len(samples) - 1), len(pairs))
        assert r2.prefills == len(samples) - 1  # the finished sample is not prefilled again
        df = st.frame()
        assert len(df) == len(pairs) * len(samples)
        # finished rows untouched
        old = df[df.id.isin(first.id)]
        assert old[["id", "created_at", "prediction"]].equals(first[["id", "created_at", "prediction"]])
        assert not st.add({c: first.iloc[0][c] for c in first.columns if c != "id"})  # same key: ignored
        assert st.count() == len(df)
        # another code version is another key
        r3 = run_sweep(model, tok, samples[:1], pairs, st, model_name="tiny", progress=False, code_version="v2")
        assert r3.added == len(pairs)
        assert df.kv_bytes.gt(0).all() and (df.kv_bytes <= df.full_kv_bytes).all()
        half = df[df.compression_ratio == 0.5]
        assert (half.kv_bytes < half.full_kv_bytes).all()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    dup = con.execute("SELECT COUNT(*) FROM (SELECT 1 FROM results GROUP BY model, method, params_json, compression_ratio, "
                      "task, sample_id, seed, code_version HAVING COUNT(*) > 1)").fetchone()[0]
    assert dup == 0


def test_method_params_are_json_and_tell_configurations_apart():
    p = method_params(kq.methods.PyramidKV(scorer=kq.methods.TOVA(), compression_ratio=0.5))
    assert p["scorer"]["name"] == "tova" and "compression_ratio" not in p
    q1 = method_params(kq.methods.QFilters(filters=torch.ones(2, 2, 4)))
    q2 = method_params(kq.methods.QFilters(filters=torch.zeros(2, 2, 4)))
    assert q1["filters"].startswith("tensor:") and q1 != q2
    json.dumps([p, q1])
    pairs = make_pairs(["snapkv", kq.get_method("snapkv", window=16), kq.get_method("knorm", budget=32)], [0.5, 0.75])
    assert [(x.name, x.compression_ratio) for x in pairs] == [("snapkv", 0.5), ("snapkv", 0.75), ("snapkv", 0.5),
                                                  ("snapkv", 0.75), ("knorm", -1.0)]
    assert len({x.params_json for x in pairs}) == 3


def _cli(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "kvsqueeze.cli", *args], env=env, capture_output=True, text=True,
                          **kw)


def test_kill_9_in_the_middle_then_resume(tiny_dir, tmp_path):
    db = tmp_path / "sweep.sqlite"
    env = {**os.environ, "KVSQUEEZE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    args = ["sweep", "--model", str(tiny_dir), "--methods", "full,snapkv,knorm,streaming_llm", "--compression-ratios",
            "0.5,0.75", "--tasks", "passkey", "--samples", "8", "--length", "768", "--results", str(db),
            "--batch-size", "2", "--code-version", "test"]
    total = 8 * (1 + 3 * 2)
    proc = subprocess.Popen([sys.executable, "-m", "kvsqueeze.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    n = 0
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            if db.exists():
                try:
                    n = sqlite3.connect(db).execute("SELECT COUNT(*) FROM results").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0
                if n >= 3:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the sweep finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    before = con.execute("SELECT id, method, compression_ratio, sample_id, created_at, prediction FROM results").fetchall()
    con.close()
    assert 3 <= len(before) < total
    out = _cli(args + ["--quiet"], env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"{total - len(before)} rows added, {len(before)} already stored" in out.stdout
    con = sqlite3.connect(db)
    after = con.execute("SELECT id, method, compression_ratio, sample_id, created_at, prediction FROM results").fetchall()
    assert len(after) == total
    assert set(before) <= set(after)  # finished rows neither lost nor recomputed (same id, time, answer)
    assert len({r[1:4] for r in after}) == total  # no duplicates


def test_eval_command_runs_the_reference_and_prints_a_table(tiny_dir, tmp_path):
    env = {**os.environ, "KVSQUEEZE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    db = tmp_path / "e.sqlite"
    out = _cli(["eval", "--model", str(tiny_dir), "--method", "tova", "--compression-ratio", "0.6", "--tasks", "passkey,ppl",
                "--samples", "1", "--length", "384", "--ppl-tokens", "8", "--results", str(db), "--quiet"], env,
               timeout=300)
    assert out.returncode == 0, out.stderr
    assert "rows added" in out.stdout and "passkey" in out.stdout and "perplexity" in out.stdout
    df = ResultStore(db).frame()
    assert sorted(set(zip(df.method, df.compression_ratio))) == [("full", 0.0), ("tova", 0.6)]
    assert set(df.task) == {"passkey", "ppl"}
    ppl = df[df.task == "ppl"].set_index("method")
    assert ppl.loc["tova", "kv_bytes"] < ppl.loc["full", "kv_bytes"]
    assert (ppl.score > 1).all()


@pytest.mark.parametrize("args, message", [
    (["sweep", "--methods", "snapkv,nope"], "unknown method 'nope'"),
    (["sweep", "--compression-ratios", "0.5,1.5"], "--compression-ratios must be in [0.0, 1.0)"),
    (["sweep", "--tasks", "passkey,bogus"], "unknown task 'bogus'"),
    (["eval", "--niah-depths", "0.5,2"], "--niah-depths must be in [0.0, 1.0]"),
    (["report", "missing.sqlite"], "results file not found"),
])
def test_bad_input_is_one_error_line(args, message, tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    r = CliRunner().invoke(main, args + (["--results", str(tmp_path / "x.sqlite")] if args[0] != "report" else []))
    assert r.exit_code == 2, r.output
    lines = [l for l in r.output.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.output


def test_report_of_an_empty_store_is_a_clear_error(tmp_path):
    from kvsqueeze.evaluation.report import write_report

    ResultStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(KVSqueezeError, match="no results yet"):
        write_report(tmp_path / "empty.sqlite", tmp_path / "r.html")
    (tmp_path / "junk.sqlite").write_text("not a database at all " * 100)
    with pytest.raises(KVSqueezeError, match="not a kvsqueeze results database"):
        ResultStore(tmp_path / "junk.sqlite")


def test_sample_too_long_for_the_model_is_refused(tiny):
    model, tok = tiny
    s = Sample("word " * 5000, "q?", ["a"], max_new_tokens=4, task="t", sample_id="x")
    with pytest.raises(KVSqueezeError, match="exceed the model's 4096 positions"):
        run_sweep(model, tok, [s], make_pairs(["knorm"], [0.5]), None, model_name="tiny", progress=False,
                  code_version="t")


def test_jsonl_data_through_the_sweep(tiny, tmp_path):
    model, tok = tiny
    p = tmp_path / "mine.jsonl"
    rows = [{"context": "The vault code is 4417. " + "Filler text here. " * 30, "question": "What is the code?",
             "answer": ["4417"], "max_new_tokens": 4},
            {"context": "Paris is in France. " + "More filler. " * 30, "question": "Where is Paris?",
             "answers": "France", "answer_prefix": "Answer:", "max_new_tokens": 4}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ss = build_samples(tok, f"jsonl:{p}", TaskConfig(samples=5))
    store = ResultStore(tmp_path / "r.sqlite")
    res = run_sweep(model, tok, ss, make_pairs(["full", "knorm"], [0.5]), store, model_name="tiny", progress=False,
                    code_version="t")
    df = store.frame()
    assert res.added == 4 and set(df.task) == {"jsonl:mine"}
    assert sorted(json.loads(a) for a in df.answers_json.unique()) == [["4417"], ["France"]]
    assert set(df.metric) == {"string_match_all"} and df.score.between(0, 1).all()


def test_greedy_decode_batch_rows_are_their_own_greedy_decode_and_stop_at_their_own_eos():
    from conftest import tiny_llama
    from kvsqueeze.runtime.generate import greedy_decode, greedy_decode_batch, prefill

    model = tiny_llama(layers=2)
    ids = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))

    def alone(r, eos, n=8):
        cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
        return greedy_decode(model, cache, prefill(model, cache, ids[r : r + 1]), n, eos)

    ref = [alone(0, set()), alone(1, set())]
    assert all(len(t) == 8 for t in ref)
    # an EOS that row 0 reaches before the end and row 1 never emits (or emits later): the rows stop apart
    i = next(i for i in range(1, 8) if ref[0][i] not in ref[0][:i])
    eos = {ref[0][i]}
    cut = [t[: t.index(ref[0][i])] if ref[0][i] in t else t for t in ref]
    assert len(cut[0]) == i and len(cut[0]) != len(cut[1])
    assert [alone(0, eos), alone(1, eos)] == cut
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    assert greedy_decode_batch(model, cache, prefill(model, cache, ids), 8, eos) == cut
    cache = kq.CompressedCache(model, kq.get_method("knorm", compression_ratio=0.5))
    assert greedy_decode_batch(model, cache, prefill(model, cache, ids), 3, set()) == [t[:3] for t in ref]
    with pytest.raises(KVSqueezeError, match="decodes one row"):
        greedy_decode(model, cache, torch.zeros(2, 101), 3, set())
