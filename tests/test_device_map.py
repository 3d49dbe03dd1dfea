"""A model split over devices by `device_map` (issue 12, item 3): loading, the eager compressed cache on each
layer's device, the static path's refusal, the CLI's --device-map.

The split tests dispatch a tiny random Llama with accelerate (`dispatch_model`, as transformers'
`from_pretrained(device_map=...)` does for a map of several devices): layers 0-1 with the embeddings on the first
device, layers 2-3 with the final norm and lm_head on the second, accelerate's hooks moving each module's inputs.
They always run with ("cpu", "cpu") (hooks forced: the code path of a split model, on one device), and with
("cuda:0", "cuda:1") where two GPUs are visible (skipped otherwise). On a machine with 2 GPUs:

    PYTHONPATH=$PWD/src python -m pytest -q -p no:cacheprovider tests/test_device_map.py

The split run must give the tokens of the same model on one device (float32), with each cache layer's keys,
values, slot table and selector state on its own layer's device.
"""

from types import SimpleNamespace

import pytest
import torch
from accelerate import dispatch_model

import kvsqueeze as kq
from kvsqueeze.devices import input_device, model_devices, resolve_device_map
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.methods import for_storage, get_method
from kvsqueeze.quant import parse_quant
from kvsqueeze.runtime.cache import CompressedCache
from kvsqueeze.runtime.generate import answer_tokens, decode_step, generate_answer, prefill
from kvsqueeze.runtime.static import StaticCompressedCache, check_model
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.storage.offload import OffloadLayer

from conftest import assert_one_error_line, kv, tiny_llama

TWO_GPUS = torch.cuda.is_available() and torch.cuda.device_count() >= 2
two_gpus = pytest.mark.skipif(not TWO_GPUS, reason="needs 2 CUDA GPUs (torch.cuda.device_count() < 2)")
SPLITS = [pytest.param(("cpu", "cpu"), id="cpu-hooks"),
          pytest.param(("cuda:0", "cuda:1"), id="cuda0-cuda1", marks=two_gpus)]


def split_map(devs, layers=4) -> dict:
    """Module name -> device: the embeddings and the first half of the layers on devs[0], the rest on devs[1]."""
    d0, d1 = devs
    return {"model.embed_tokens": d0, "model.rotary_emb": d0,
            **{f"model.layers.{i}": d0 if i < layers // 2 else d1 for i in range(layers)},
            "model.norm": d1, "lm_head": d1}


def split_llama(devs):
    """The tiny Llama (conftest, seed 0) dispatched over `devs` with accelerate's hooks."""
    model = tiny_llama()  # as transformers' from_pretrained(device_map=...) dispatches it (its skip_keys too)
    return dispatch_model(model, device_map=split_map(devs), force_hooks=True,
                          skip_keys=model._skip_keys_device_placement)


def layer_device(model, i: int) -> torch.device:
    """Where decoder layer i computes: its accelerate hook's execution device, else its weights' device."""
    mod = model.model.layers[i]
    dev = getattr(getattr(mod, "_hf_hook", None), "execution_device", None)
    return torch.device(dev) if dev is not None else mod.self_attn.k_proj.weight.device


def _kivi2():
    spec = parse_quant("kivi-2")
    return for_storage(get_method("snapkv", compression_ratio=0.75), spec), spec.layer_factory


CASES = {  # name -> () -> keyword arguments of CompressedCache (fresh objects per run: methods and selectors hold
    # state); the selectors' sparse layers sit on both devices (dense_layers=(0,))
    "snapkv-4x": lambda: dict(method=get_method("snapkv", compression_ratio=0.75)),
    "quest": lambda: dict(selector=Quest(32, dense_layers=(0,))),
    "snapkv-4x+quest": lambda: dict(method=get_method("snapkv", compression_ratio=0.75),
                                    selector=Quest(32, dense_layers=(0,))),
    "snapkv-4x+quest+offload": lambda: dict(method=get_method("snapkv", compression_ratio=0.75),
                                            selector=Quest(32, dense_layers=(0,)), offload="cpu"),
    "attention_predictor": lambda: dict(selector=AttentionPredictor(64, predictor=PredictorNet().init_blend(),
                                                                    sink=16, local=16, dense_layers=(0,))),
    "windowkv": lambda: dict(method=get_method("windowkv", compression_ratio=0.75)),  # one group of 4 layers
    "adakv": lambda: dict(method=get_method("adakv", compression_ratio=0.75)),
    "d2o": lambda: dict(method=get_method("d2o", compression_ratio=0.75)),
    "knorm-interval": lambda: dict(method=get_method("knorm", budget=40, compression_interval=2)),
    "snapkv+kivi-2": lambda: dict(zip(("method", "layer_factory"), _kivi2())),
}


def _run(model, case: str, chunk_size: int | None = 48):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 101, (1, 112), generator=gen)
    question = torch.randint(0, 101, (1, 5), generator=gen)
    dev = input_device(model)
    cache = CompressedCache(model, **CASES[case]())
    prefill(model, cache, ids.to(dev), chunk_size)
    tokens = answer_tokens(model, cache, question.to(dev), 12, set())
    return tokens, cache


def _assert_layers_on_their_devices(model, cache):
    for i, layer in enumerate(cache.layers):
        want = layer_device(model, i)
        assert isinstance(layer, CompressedLayer) and layer.device == want, (i, layer.device, want)
        host = ("store.keys", "store.values", "keys", "values") if isinstance(layer, OffloadLayer) else ()
        for name, t in layer.tensors().items():
            if name in host:  # an offloaded layer's host tier: on the CPU by design
                assert t.device.type == "cpu", (i, name, t.device)
            else:
                assert t.device == want, (i, name, t.device, want)
        st = getattr(cache.selector, "state", {}).get(i, {})
        on_host = getattr(cache.selector, "host_state", ())  # host-side control flags: on the CPU by design
        for name, t in st.items():
            if isinstance(t, torch.Tensor):
                assert t.device == (torch.device("cpu") if name in on_host else want), (i, name, t.device, want)


@pytest.mark.parametrize("devs", SPLITS)
@pytest.mark.parametrize("case", list(CASES))
def test_split_model_generates_the_single_device_tokens(devs, case):
    """Chunked prefill + question + 12 greedy steps over a model split at layer 2: the tokens of the model on one
    device, and every cache layer's tensors (and Quest's page metadata) on its own layer's device."""
    ref, _ = _run(tiny_llama().to(devs[0]), case)
    model = split_llama(devs)
    assert input_device(model) == torch.device(devs[0])
    out, cache = _run(model, case)
    assert out == ref
    _assert_layers_on_their_devices(model, cache)
    if devs[0] != devs[1]:
        assert {layer.device for layer in cache.layers} == {torch.device(d) for d in devs}


@pytest.mark.parametrize("devs", SPLITS)
def test_split_model_padded_batch_generate_and_row_selection(devs):
    """transformers' generate() with a left-padded batch of 2 over a split model (the padding mask reaches every
    layer on its device), then `batch_select_indices` with indices on the first device: the tokens of one device."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 101, (2, 80), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :17], mask[1, :17] = 0, 0  # row 1 left-padded

    def run(model):
        dev = input_device(model)
        cache = CompressedCache(model, get_method("snapkv", compression_ratio=0.75))
        out = model.generate(ids.to(dev), attention_mask=mask.to(dev), **kv(cache), max_new_tokens=8,
                             do_sample=False, pad_token_id=0)
        cache.batch_select_indices(torch.tensor([1], device=dev))  # keep row 1
        nxt = decode_step(model, cache, out[1:, -1].to(dev)).argmax(-1)
        return out[:, ids.shape[1]:].tolist(), nxt.tolist(), cache

    ref_tokens, ref_next, _ = run(tiny_llama().to(devs[0]))
    model = split_llama(devs)
    tokens, nxt, cache = run(model)
    assert tokens == ref_tokens and nxt == ref_next
    _assert_layers_on_their_devices(model, cache)


def test_compressed_layer_keeps_its_store_on_the_states_device():
    """A CompressedLayer's store, slot table and positions live on the device of the key states it receives (meta
    here: any device but the CPU's default), not on a global one, through appends and batch operations."""
    for factory in (CompressedLayer, parse_quant("kivi-2").layer_factory):
        layer = factory()
        k = torch.empty(2, 2, 5, 16, device="meta")
        keys, values = layer.update(k, k)
        layer.update(k[:, :, :1], k[:, :, :1])
        assert layer.device == torch.device("meta") and layer.n_stored == 6
        assert keys.device.type == values.device.type == "meta"
        assert layer.positions.device.type == "meta"
        assert layer.tensors() and all(t.device.type == "meta" for t in layer.tensors().values())
        layer.batch_select_indices(torch.tensor([1]))  # indices from the CPU
        assert layer.positions.shape[0] == 1 and all(t.device.type == "meta" for t in layer.tensors().values())


def test_static_path_refuses_a_model_on_several_devices():
    """check_model (before any prefill: generate_answer(static=True)) and StaticCompressedCache.from_cache refuse a
    model / cache spanning two devices with one KVSqueezeError line; one device passes (hooks or not)."""
    model = tiny_llama()
    check_model(model)
    check_model(split_llama(("cpu", "cpu")))  # accelerate's hooks on one device: still one device
    model.model.layers[3]._hf_hook = SimpleNamespace(execution_device=1)  # as accelerate's hook on cuda:1
    assert model_devices(model) == [torch.device("cpu"), torch.device("cuda:1")]
    with pytest.raises(KVSqueezeError, match="split over cpu, cuda:1") as e:
        check_model(model)
    assert "\n" not in str(e.value)

    model = tiny_llama()
    cache = CompressedCache(model, get_method("snapkv", compression_ratio=0.5))
    prefill(model, cache, torch.randint(0, 101, (1, 40)))
    StaticCompressedCache.from_cache(cache, 4)  # one device: built
    cache.layers[2].device = torch.device("meta")  # as if layer 2 sat on another device
    with pytest.raises(KVSqueezeError, match="split over cpu, meta"):
        StaticCompressedCache.from_cache(cache, 4)


def test_generate_answer_static_refuses_before_the_prefill(monkeypatch):
    class Tok:  # what generate_answer reads of a tokenizer
        chat_template = None
        bos_token_id = None
        eos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return type("E", (), {"input_ids": [ord(c) % 101 for c in text]})()

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    model = tiny_llama()
    model.model.layers[1]._hf_hook = SimpleNamespace(execution_device="cuda:1")
    ran = []
    monkeypatch.setattr("kvsqueeze.runtime.generate.prefill", lambda *a, **k: ran.append(1))
    with pytest.raises(KVSqueezeError, match="static decode path runs a model on one device"):
        generate_answer(model, Tok(), "some context " * 8, "q?", get_method("knorm", compression_ratio=0.5),
                        static=True)
    assert not ran


# --- loading ------------------------------------------------------------------------------------------------------
CONTEXT = "The grass is green. The sky is blue. " * 30 + "The pass key is 71432. " + "Here we go. " * 20


def _answer(model, tok):
    res = generate_answer(model, tok, CONTEXT, "What is the pass key?", get_method("snapkv", compression_ratio=0.75),
                          max_new_tokens=8, chunk_size=128, selector=Quest(64, dense_layers=(0,)))
    return res.answer, res.stats.kv_bytes


def _module_map(devs, layers=3) -> dict:
    """A device_map dict for the saved tiny Llama (3 layers, tied embeddings: lm_head with them)."""
    d0, d1 = devs
    return {"model.embed_tokens": d0, "lm_head": d0, "model.rotary_emb": d0, "model.layers.0": d0,
            **{f"model.layers.{i}": d1 for i in range(1, layers)}, "model.norm": d1}


def test_load_model_device_map_dict_on_cpu_answers_as_without(tiny_dir, tmp_path, monkeypatch):
    """load_model(device_map={every module: 'cpu'}) hands the map to transformers' from_pretrained and never calls
    model.to(); its answer and bytes kept equal the plain load's."""
    import transformers

    from conftest import own_cache

    with own_cache(tmp_path / "cache"):
        ref = _answer(*kq.load_model(str(tiny_dir)))
        moved, maps = [], []
        orig_to, orig_load = torch.nn.Module.to, transformers.AutoModelForCausalLM.from_pretrained

        def to(self, *a, **k):
            moved.append(a or k)
            return orig_to(self, *a, **k)

        def load(*a, **k):
            maps.append(k.get("device_map"))
            return orig_load(*a, **k)

        monkeypatch.setattr(torch.nn.Module, "to", to)
        monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", load)
        model, tok = kq.load_model(str(tiny_dir), device_map=_module_map(("cpu", "cpu")))
        monkeypatch.undo()
        assert not moved and maps == [_module_map(("cpu", "cpu"))]
        assert _answer(model, tok) == ref
        auto, tok = kq.load_model(str(tiny_dir), device_map="auto")  # no GPU visible: all on the CPU
        assert _answer(auto, tok) == ref


@two_gpus
def test_load_model_split_over_two_gpus_answers_as_one(tiny_dir, tmp_path):
    """load_model(device_map=dict over cuda:0 / cuda:1): transformers dispatches it (hooks), the answer and the
    bytes kept equal the model on cuda:0."""
    from conftest import own_cache

    with own_cache(tmp_path / "cache"):
        ref = _answer(*kq.load_model(str(tiny_dir), device="cuda:0"))
        model, tok = kq.load_model(str(tiny_dir), device_map=_module_map(("cuda:0", "cuda:1")))
        assert set(model_devices(model)) == {torch.device("cuda:0"), torch.device("cuda:1")}
        assert _answer(model, tok) == ref


def test_load_model_device_map_refusals(tiny_dir):
    with pytest.raises(KVSqueezeError, match="not both"):
        kq.load_model(str(tiny_dir), device="cpu", device_map="auto")
    with pytest.raises(KVSqueezeError, match="device_map must be one of"):
        kq.load_model(str(tiny_dir), device_map="everywhere")


def test_resolve_device_map():
    assert resolve_device_map("none") is None and resolve_device_map(None) is None
    assert resolve_device_map("AUTO", "cpu") == "auto"
    with pytest.raises(KVSqueezeError, match="drop --device cuda"):
        resolve_device_map("auto", "cuda")
    with pytest.raises(KVSqueezeError, match="--device-map must be one of"):
        resolve_device_map("gpu0")


# --- CLI ----------------------------------------------------------------------------------------------------------
def test_cli_device_map(tiny_dir, tmp_path):
    """`generate --device-map auto` answers as without (no GPU: the map puts everything on the CPU); with an explicit
    --device other than cpu, an unknown map or --compile: one error line (eval and sweep alike)."""
    from click.testing import CliRunner

    from conftest import own_cache
    from kvsqueeze.cli import main

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    args = ["generate", "--model", str(tiny_dir), "--method", "snapkv", "--compression-ratio", "0.75",
            "--context-file", str(ctx), "--question", "What is the pass key?", "--max-new-tokens", "6"]
    with own_cache(tmp_path / "cache"):
        plain = CliRunner().invoke(main, args)
        split = CliRunner().invoke(main, args + ["--device-map", "auto"])
    assert plain.exit_code == 0 and split.exit_code == 0, split.output
    assert split.output.splitlines()[:2] == plain.output.splitlines()[:2]  # answer, method line
    assert_one_error_line(args + ["--device-map", "auto", "--device", "cuda:1"], "drop --device cuda:1")
    assert_one_error_line(args + ["--device-map", "gpus"], "--device-map must be one of")
    assert_one_error_line(args + ["--device-map", "auto", "--compile"], "--compile decodes on one device")
    for cmd in (["eval", "--method", "snapkv"], ["sweep", "--methods", "snapkv"]):
        assert_one_error_line(cmd + ["--model", str(tiny_dir), "--results", str(tmp_path / "r.sqlite"),
                                     "--device-map", "auto", "--device", "cuda"], "drop --device cuda")


def test_cli_sweep_device_map(tiny_dir, tmp_path, monkeypatch):
    """`sweep --device-map auto` stores the scores of the plain sweep; under torchrun (WORLD_SIZE > 1) it is one
    error line."""
    from click.testing import CliRunner

    from conftest import own_cache
    from kvsqueeze.cli import main

    args = ["sweep", "--model", str(tiny_dir), "--methods", "snapkv", "--compression-ratios", "0.5", "--tasks",
            "passkey", "--samples", "2", "--length", "256", "--code-version", "t", "--quiet"]
    with own_cache(tmp_path / "cache"):
        plain = CliRunner().invoke(main, args + ["--results", str(tmp_path / "a.sqlite")])
        split = CliRunner().invoke(main, args + ["--results", str(tmp_path / "b.sqlite"), "--device-map", "auto"])
    assert plain.exit_code == 0 and split.exit_code == 0, split.output

    def table(out):
        return out[out.index("mean score"):]

    assert "rows added" in split.output and table(split.output) == table(plain.output)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert_one_error_line(args + ["--results", str(tmp_path / "c.sqlite"), "--device-map", "auto"],
                          "under torchrun each rank holds a model of its own")
