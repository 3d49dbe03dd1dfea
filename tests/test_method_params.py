"""A method's parameters on the command line: `name(key=value,...)` (`kvsqueeze.methods.get_method`), lists of
such names split on the commas outside parentheses (`split_methods`), the values coerced from the dataclass field's
type, bad input one `KVSqueezeError` line naming the method's fields, and a tuned and a default configuration of
one method kept apart in a sweep's results store (distinct params_json, both resumed)."""

from __future__ import annotations

import json

import pytest

import kvsqueeze as kq
from conftest import assert_one_error_line, own_cache, save_tiny_llama_with_smollm2_tokenizer
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation import ResultStore, make_pairs
from kvsqueeze.methods import (D2O, KVCrush, KVMerger, MiniCache, SnapKV, WindowKV, get_method, method_spec,
                               split_methods)


@pytest.mark.parametrize("text, expected", [
    ("full,h2o", ["full", "h2o"]),
    (" full , kvmerger(threshold=0.5,protect_share=0.25),adakv:snapkv,",
     ["full", "kvmerger(threshold=0.5,protect_share=0.25)", "adakv:snapkv"]),
    ("kvcrush:snapkv(crush_share=0.5),minicache(t=0.3,start_layer=20)",
     ["kvcrush:snapkv(crush_share=0.5)", "minicache(t=0.3,start_layer=20)"]),
    ("", []),
])
def test_split_methods_splits_outside_parentheses(text, expected):
    assert split_methods(text) == expected


@pytest.mark.parametrize("text", ["kvmerger(threshold=0.5", "kvmerger)threshold=0.5(", "a,b)"])
def test_split_methods_refuses_unbalanced_parentheses(text):
    with pytest.raises(KVSqueezeError, match="unbalanced"):
        split_methods(text)


def test_parameters_are_coerced_to_the_field_types():
    m = get_method("minicache(t=0.3,start_layer=20)", compression_ratio=0.5)
    assert isinstance(m, MiniCache) and m.t == 0.3 and m.start_layer == 20 and isinstance(m.start_layer, int)
    assert m.compression_ratio == 0.5 and m.gamma == MiniCache().gamma  # the rest stays the default
    m = get_method("minicache(start_layer=none, gamma=1)")
    assert m.start_layer is None and m.gamma == 1.0 and isinstance(m.gamma, float)
    k = get_method("kvcrush:snapkv(crush_share=0.5,anchor='random')")
    assert isinstance(k, KVCrush) and isinstance(k.scorer, SnapKV) and k.crush_share == 0.5 and k.anchor == "random"
    for text, want in (("true", True), ("False", False), ("1", True), ("no", False)):
        assert get_method(f"kvmerger(merge_edges={text})").merge_edges is want
    w = get_method("windowkv(mode=aggregation)")
    assert isinstance(w, WindowKV) and w.mode == "aggregation" and w.window == 16  # the mode's own default
    # the parenthesised value wins over the keyword argument (the command line's --compression-interval)
    assert get_method("h2o(compression_interval=4)", compression_interval=0).compression_interval == 4


@pytest.mark.parametrize("spec, message", [
    ("kvmerger(thresh=0.5)", "unknown parameter 'thresh'; kvmerger's parameters: compression_interval (int), "
                             "threshold (float)"),
    ("kvmerger(threshold=abc)", "threshold='abc' is not a value of type float; kvmerger's parameters:"),
    ("minicache(start_layer=0.5)", "start_layer='0.5' is not a value of type int | None"),
    ("kvmerger(threshold=none)", "is not a value of type float"),
    ("kvmerger(merge_edges=maybe)", "merge_edges='maybe' is not a value of type bool"),
    ("kvmerger(threshold)", "parameters are key=value, got 'threshold'"),
    ("kvmerger(threshold=0.5,threshold=0.6)", "threshold given twice"),
    ("kvmerger(compression_ratio=0.5)", "use --compression-ratio"),
    ("kvcrush(scorer=snapkv)", "the name after the colon"),
    ("d2o(exempt_layers=1)", "unknown parameter 'exempt_layers'"),  # a tuple: --exempt-layers sets it
    ("kvcrush(crush_share=0.5):snapkv", "parameters go in one pair of parentheses after the whole name"),
    ("nope(x=1)", "unknown method 'nope'"),
])
def test_bad_parameters_are_one_error(spec, message):
    with pytest.raises(KVSqueezeError, match=None) as e:
        get_method(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("m", [KVMerger(threshold=0.5), D2O(ema=0.9, compress_edges=True), MiniCache(t=0.3),
                               KVCrush(scorer=SnapKV(), crush_share=0.5), KVMerger(), WindowKV(mode="aggregation"),
                               MiniCache(start_layer=None, gamma=0.2)])
def test_method_spec_rebuilds_the_method(m):
    assert get_method(method_spec(m)) == m


def test_method_spec_names_only_what_differs_from_the_default():
    assert method_spec(KVMerger()) == "kvmerger"
    assert method_spec(KVMerger(threshold=0.5)) == "kvmerger(threshold=0.5)"
    assert method_spec(D2O(compress_edges=True)) == "d2o(compress_edges=true)"
    assert method_spec(KVCrush(scorer=SnapKV(), crush_share=0.5)) == "kvcrush:snapkv(crush_share=0.5)"


def test_recommend_config_keeps_the_tuned_parameters():
    from kvsqueeze.cli.options import build_method
    from kvsqueeze.evaluation.recommend import config_dict, generate_line

    pair = make_pairs(["kvmerger(threshold=0.5)"], [0.75])[0]
    cfg = config_dict(pair, "m")
    assert cfg["method"] == "kvmerger(threshold=0.5)"
    assert "--method 'kvmerger(threshold=0.5)'" in generate_line(cfg)  # quoted for the shell
    assert build_method(cfg["method"], cfg["compression_ratio"], None, "", 0) == pair.method


def test_tuned_and_default_are_distinct_rows_and_resume(tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    model_dir = save_tiny_llama_with_smollm2_tokenizer(tmp_path / "tiny")
    db = tmp_path / "r.sqlite"
    args = ["sweep", "--model", str(model_dir), "--methods", "kvmerger,kvmerger(threshold=0.5,protect_share=0.25)",
            "--compression-ratios", "0.5", "--tasks", "passkey", "--samples", "1", "--length", "320",
            "--results", str(db), "--code-version", "t", "--quiet"]
    with own_cache(tmp_path / "cache"):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert "2 rows added, 0 already stored" in r.output
        # the printed table keeps the two configurations apart
        assert "kvmerger(protect_share=0.25,threshold=0.5)" in r.output
        assert "kvmerger(protect_share=0.5,threshold=0.75)" in r.output
        df = ResultStore(db).frame()
        params = sorted((json.loads(p) for p in df.params_json), key=lambda p: p["threshold"])
        assert list(df.method) == ["kvmerger", "kvmerger"]
        assert [(p["threshold"], p["protect_share"]) for p in params] == [(0.5, 0.25), (0.75, 0.5)]
        r = CliRunner().invoke(main, args)  # resumes: both configurations already stored
        assert r.exit_code == 0, r.output
        assert "0 rows added, 2 already stored" in r.output


def test_cli_bad_parameter_is_one_error_line(tmp_path):
    assert_one_error_line(["sweep", "--methods", "full,kvmerger(thresh=0.5)", "--results",
                           str(tmp_path / "x.sqlite")], "unknown parameter 'thresh'; kvmerger's parameters:")
    assert_one_error_line(["sweep", "--methods", "full,kvmerger(threshold=0.5", "--results",
                           str(tmp_path / "x.sqlite")], "unbalanced '('")


def test_get_method_is_exported():
    assert kq.get_method("kvmerger(threshold=0.5)").threshold == 0.5


def test_method_label_shows_the_parameters_given():
    """`generate`'s `method:` line (method_label) names parameters given in parentheses that describe() leaves
    out, and adds nothing for a method at its defaults."""
    from kvsqueeze.methods import get_method, method_label

    m = get_method("minicache(start_layer=24)", compression_ratio=0.0)
    assert "start_layer=24" in method_label(m) and "start_layer" not in m.describe()
    d = get_method("d2o(ema=0.9)", compression_ratio=0.5)
    assert "ema=0.9" in method_label(d)
    plain = get_method("d2o", compression_ratio=0.5)
    assert method_label(plain) == plain.describe()
