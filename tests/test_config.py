"""Configs kvsqueeze must read right: sliding windows without `layer_types`, multi-head attention without
`num_key_value_heads`, and layer indices a user gives (issue 9, items 5, 7, 12)."""

import pytest
import torch
from click.testing import CliRunner

import kvsqueeze as kq
from kvsqueeze.cli import main

from conftest import tiny_llama


# --- item 12: layer indices are checked against the model ---------------------------------------------------------
def _tiny_model_dir(path, layers=4):
    """A tiny Llama plus a word-level tokenizer saved as a local model directory (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    vocab["<unk>"] = 100
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", eos_token="w0")
    tiny_llama(layers=layers).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["knorm", "snapkv", "pyramidkv", "streaming_llm"])
@pytest.mark.parametrize("bad", [(4,), (0, 99)])
def test_exempt_layers_out_of_range_are_refused_naming_the_range(method, bad):
    model = tiny_llama(layers=4)
    m = kq.get_method(method, ratio=0.5, exempt_layers=bad)
    with pytest.raises(kq.KVSqueezeError, match=r"layer indices must be in 0\.\.3 \(the model has 4 layers\)"):
        kq.CompressedCache(model, m)
    kq.CompressedCache(model, kq.get_method(method, ratio=0.5, exempt_layers=(0, 3)))  # in range: accepted


@pytest.mark.parametrize("quant", ["kivi-2", "mikv-8-2", "zipcache-4-2"])
def test_exempt_layers_are_checked_through_quantization_wrappers(quant):
    from kvsqueeze.quant import parse_quant

    spec = parse_quant(quant)
    m = spec.method(kq.get_method("knorm", ratio=0.5, exempt_layers=(7,)))
    with pytest.raises(kq.KVSqueezeError, match=r"exempt layers 7: layer indices must be in 0\.\.3"):
        kq.CompressedCache(tiny_llama(layers=4), m, layer_factory=spec.layer_factory)


@pytest.mark.parametrize("selector", ["Quest", "AttentionPredictor"])
def test_selector_dense_layers_out_of_range_are_refused(selector):
    from kvsqueeze import selection

    sel = getattr(selection, selector)(64, dense_layers=(0, 5))
    with pytest.raises(kq.KVSqueezeError, match=r"dense layers 5: layer indices must be in 0\.\.3"):
        kq.CompressedCache(tiny_llama(layers=4), None, selector=sel)


def test_negative_or_non_integer_layer_indices_are_refused():
    from kvsqueeze.selection import Quest

    with pytest.raises(kq.KVSqueezeError, match="negative indices are not supported"):
        kq.get_method("knorm", ratio=0.5, exempt_layers=(-1,))
    with pytest.raises(kq.KVSqueezeError, match="negative indices are not supported"):
        Quest(64, dense_layers=(0, -2))
    with pytest.raises(kq.KVSqueezeError, match="must be layer indices"):
        kq.get_method("knorm", ratio=0.5, exempt_layers=("a",))


def test_cli_exempt_layers_out_of_range_exits_2_with_one_line(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(" ".join(f"w{i % 100}" for i in range(60)))
    args = ["generate", "--model", str(model_dir), "--context-file", str(ctx), "--question", "w1 w2",
            "--max-new-tokens", "2"]
    r = CliRunner().invoke(main, args + ["--exempt-layers", "99"])
    assert r.exit_code == 2, r.output
    err = [line for line in r.output.splitlines() if line.strip()]
    assert err == ["error: exempt layers 99: layer indices must be in 0..3 (the model has 4 layers)"]
    r = CliRunner().invoke(main, args + ["--exempt-layers", "-1"])
    assert r.exit_code == 2 and "negative indices are not supported" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--exempt-layers", "0,3"])
    assert r.exit_code == 0, r.output
