"""Everything a method, selector or quantization scheme owns follows the model's device and dtype (issue 9,
item 11): predictor weights, Q-Filters' filters, Quest's page metadata, quantization tables.

The device tests run a small random Llama (the tiny config, and one with Llama-3.1-8B heads: head_dim 128, 32 query
and 8 kv heads, 2 layers) in bfloat16 on CUDA, with every method (prefill + a chunk + decode steps, compared with a
masked full-cache reference), every selector, every quantization scheme. The predictor and the filters are built on
the CPU, as loading and calibration leave them, before the model runs on the GPU. They skip without CUDA;
KVSQUEEZE_TEST_DEVICE=cpu runs them on the CPU instead. On the GPU machine (about 30 s on an H200):

    PYTHONPATH=$PWD/src python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_quant_triton.py

`test_every_method_selector_and_scheme_runs_in_bf16_on_cpu` always runs: the same dtype placement on the CPU.
"""

import copy
import os

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import kvsqueeze as kq
from kvsqueeze.runtime import calibration
from kvsqueeze.storage import CompressedLayer
from kvsqueeze.methods import METHODS, H2O, for_storage, qfilters
from kvsqueeze.quant import parse_quant
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest

from conftest import Spy, kv

DEVICE = os.environ.get("KVSQUEEZE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
on_device = pytest.mark.skipif(DEVICE is None, reason="no GPU (KVSQUEEZE_TEST_DEVICE=cpu runs it on the CPU)")
DTYPE = torch.bfloat16
SCHEMES = ["kivi-2", "kivi-4", "gear-4", "mikv-8-2", "zipcache-4-2"]
SHAPES = {  # name -> (config kwargs, dense layers of the selectors)
    "tiny": (dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16), (0, 1)),
    "8b-heads": (dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128), (0,)),
}


def _model(shape, device, dtype):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, max_position_embeddings=1024, attn_implementation="sdpa", **SHAPES[shape][0])
    return LlamaForCausalLM(cfg).eval().to(device, dtype)


def _ids(n, seed=1):
    return torch.randint(0, 101, (1, n), generator=torch.Generator().manual_seed(seed))


# --- a masked full-cache reference (as tests/test_cache.py's), on any device -------------------------------------
_REF = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention over the full cache; keys outside `_REF["kept"][layer]` (slots kept before this forward, or
    a selector's pick) are masked, this forward's own tokens are not (causality comes from the mask)."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, dim=1), value.repeat_interleave(g, dim=1)
    logits = (query @ k.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : k.shape[-2]].float()
    kept = _REF["kept"].get(module.layer_idx)
    if kept is not None:
        n, q = k.shape[-2], query.shape[2]
        pos, valid = kept if isinstance(kept, tuple) else (kept, None)
        allowed = torch.zeros(k.shape[0], key.shape[1], n, dtype=torch.bool, device=key.device)
        held = torch.ones_like(pos, dtype=torch.bool) if valid is None else valid  # empty slots (ragged heads) hidden
        allowed.scatter_(2, pos.long().to(key.device), held.to(key.device))
        allowed[:, :, n - q :] = True
        logits = logits.masked_fill(~allowed.repeat_interleave(g, dim=1)[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).to(query.dtype)
    return (probs @ v).transpose(1, 2).contiguous(), probs


AttentionInterface.register("kvsq_device_ref", _reference_attention)
AttentionMaskInterface.register("kvsq_device_ref", eager_mask)


class _CharTokenizer:
    """Enough of a tokenizer for Q-Filters' calibration: one id per character."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        class Out:
            input_ids = torch.tensor([[ord(c) % 101 for c in text]])

        return Out()


def _assert_on(t, device):
    assert t.device.type == torch.device(device).type, (tuple(t.shape), t.device)


def _layers_on(cache, device):
    for layer in cache.layers:
        if isinstance(layer, CompressedLayer) and layer.is_initialized:
            for t in layer.tensors().values():
                _assert_on(t, device)


@torch.no_grad()
def _run(model, cache, chunks, n_prefill=1):
    """Feed the chunks (the first n_prefill inside cache.prefill()); logits and, per chunk, the slots kept before."""
    outs, kept = [], []
    for i, ids in enumerate(chunks):
        kept.append({li: (layer.positions.clone(), None if layer.valid is None else layer.valid.clone())
                     for li, layer in enumerate(cache.layers)
                     if isinstance(layer, CompressedLayer) and layer.is_initialized})
        ids = ids.to(model.device)
        if i < n_prefill:
            with cache.prefill():
                outs.append(model(ids, **kv(cache)).logits)
        else:
            outs.append(model(ids, **kv(cache)).logits)
    return outs, kept


@torch.no_grad()
def _reference(model, chunks, kept):
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("kvsq_device_ref")
    dyn, outs = DynamicCache(config=ref.config), []
    for ids, k in zip(chunks, kept):
        _REF["kept"] = k
        outs.append(ref(ids.to(model.device), **kv(dyn)).logits)
    return outs


def _method(name, model, tmp_path, monkeypatch):
    if name == "qfilters":  # calibrated on the fly (short), saved, found by setup(): filters load on the CPU
        monkeypatch.setenv("KVSQUEEZE_CACHE", str(tmp_path))
        calibration.save(model, calibration.calibrate_qfilters(model, _CharTokenizer(), n_seq=2, seq_len=256, progress=False))
        m = kq.get_method(name, compression_ratio=0.5)
        calibration.prepare(m, model)
        _assert_on(m.filters, "cpu")
        return m
    if name == "prefixkv":  # profiles calibrated on the fly (short), on the CPU
        profiles = calibration.calibrate_prefixkv(model, _CharTokenizer(), n_seq=2, seq_len=128, progress=False)
        return kq.get_method(name, compression_ratio=0.5, profiles=profiles)
    kwargs = {"compression_interval": 1} if name in ("h2o", "tova") else {}
    return kq.get_method(name, **({} if name == "full" else {"compression_ratio": 0.5}), **kwargs)


def _scheme_method(spec, q):
    """The method run with a --quant scheme here: MiKV over H2O, ZipCache's own saliency, none for KIVI / GEAR."""
    if spec.startswith("zipcache"):
        return for_storage(None, q)
    return for_storage(H2O(compression_ratio=0.5), q) if spec.startswith("mikv") else None


def _check_logits(outs):
    for o in outs:
        assert bool(o.isfinite().all())


# --- on the device -----------------------------------------------------------------------------------------------
@on_device
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_the_device_matches_the_masked_reference(name, shape, tmp_path, monkeypatch):
    model = _model(shape, "cpu", torch.float32)
    method = _method(name, model, tmp_path, monkeypatch)  # setup before the model moves
    model.to(DEVICE, DTYPE)
    chunks = [_ids(160), _ids(5, seed=2), _ids(1, seed=3), _ids(1, seed=4), _ids(1, seed=5)]
    cache = kq.CompressedCache(model, method)
    got, kept = _run(model, cache, chunks)
    _check_logits(got)
    _layers_on(cache, DEVICE)
    if name == "qfilters":
        _assert_on(method.filters, DEVICE)
    if name != "full":
        assert all(n < cache.get_seq_length() for n in cache.stats().tokens_stored)
    for g, r in zip(got, _reference(model, chunks, kept)):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)  # bf16 logits of ~N(0, 0.1)


def _selectors(dense):
    torch.manual_seed(0)
    net = PredictorNet().init_blend()  # built here, on the CPU (not downloaded)
    return {"quest": Quest(64, dense_layers=dense),
            "attention_predictor": AttentionPredictor(96, predictor=net, sink=16, local=32, dense_layers=dense)}


@on_device
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["quest", "attention_predictor"])
def test_every_selector_on_the_device_attends_to_its_pick(kind, shape):
    model = _model(shape, DEVICE, DTYPE)
    sel = _selectors(SHAPES[shape][1])[kind]
    spy = Spy(sel)
    chunks = [_ids(250)] + [_ids(1, seed=10 + i) for i in range(6)]  # 6 steps: a calibration row at step 5
    cache = kq.CompressedCache(model, selector=spy)
    got, kept = _run(model, cache, chunks)
    _check_logits(got)
    sparse = {k: v for k, v in spy.picks.items() if v is not None}
    assert sparse, "no sparse step ran"
    for idx in sparse.values():
        _assert_on(idx, DEVICE)
    if kind == "attention_predictor":
        for p in sel.net.parameters():
            _assert_on(p, DEVICE)
        for li, st in sel.state.items():
            if "hist" in st:
                _assert_on(st["hist"], DEVICE)
    else:
        for li, st in sel.state.items():
            if "kmin" in st:
                _assert_on(st["kmin"], DEVICE), _assert_on(st["kmax"], DEVICE)
    # the reference: dense attention with every slot but the selector's masked, step by step
    n_layers = model.config.num_hidden_layers
    for step, ids in enumerate(chunks[1:], start=1):
        n = 250 + step
        kept[step] = {li: spy.picks.get((li, n)) for li in range(n_layers)}
    kept[0] = {}
    for g, r in zip(got, _reference(model, chunks, kept)):
        torch.testing.assert_close(g.float(), r.float(), atol=3e-2, rtol=3e-2)


@on_device
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spec", SCHEMES)
def test_every_quant_scheme_on_the_device(spec, shape):
    model = _model(shape, DEVICE, DTYPE)
    q = parse_quant(spec)
    method = _scheme_method(spec, q)
    chunks = [_ids(160), _ids(1, seed=2), _ids(1, seed=3)]
    cache = kq.CompressedCache(model, method, layer_factory=q.layer_factory)
    got, _ = _run(model, cache, chunks)
    _check_logits(got)
    assert all(layer.store.n_compressed > 0 for layer in cache.layers)
    _layers_on(cache, DEVICE)
    with torch.no_grad():
        full = model(torch.cat(chunks, 1).to(model.device)).logits[:, -1]
    assert float((got[-1][:, -1] - full).abs().max()) < 0.5 * float(full.abs().max()) + 0.1  # close, not garbage


# --- dtype placement on the CPU (always runs) ------------------------------------------------------------------------
def test_every_method_selector_and_scheme_runs_in_bf16_on_cpu(tmp_path, monkeypatch):
    """A bf16 model meets float32 tables (predictor weights, even ones saved in bf16; filters; scales)."""
    model = _model("tiny", "cpu", DTYPE)
    chunks = [_ids(80), _ids(1, seed=2), _ids(1, seed=3)]
    for name in METHODS:
        m = _method(name, model, tmp_path, monkeypatch)
        got, _ = _run(model, kq.CompressedCache(model, m), chunks)
        _check_logits(got)
    for spec in SCHEMES:
        q = parse_quant(spec)
        m = _scheme_method(spec, q)
        got, _ = _run(model, kq.CompressedCache(model, m, layer_factory=q.layer_factory), chunks)
        _check_logits(got)
    torch.manual_seed(0)
    sels = {"quest": Quest(64),
            "attention_predictor": AttentionPredictor(64, predictor=PredictorNet().init_blend().to(DTYPE),
                                                      sink=16, local=16)}
    for kind, sel in sels.items():
        spy = Spy(sel)
        got, _ = _run(model, kq.CompressedCache(model, selector=spy), chunks + [_ids(1, seed=4)] * 5)
        _check_logits(got)
        assert any(v is not None for v in spy.picks.values()), kind
    assert all(p.dtype == torch.float32 for p in sels["attention_predictor"].net.parameters())


@pytest.mark.skipif(DEVICE != "cuda" or not torch.cuda.is_available(), reason="the fused kernel needs CUDA")
def test_fused_kivi_decode_kernel_holds_bf16_values_beyond_float16():
    pytest.importorskip("triton")
    from kvsqueeze.quant import kivi
    from kvsqueeze.kernels.kivi_decode import reference_decode_attention

    torch.manual_seed(0)
    k = torch.randn(1, 8, 600, 128, device="cuda")
    v = torch.randn(1, 8, 600, 128, device="cuda")
    v[..., 5] = 1e5 * (0.9 + 0.05 * torch.rand(1, 8, 600, device="cuda"))  # beyond float16, fine in bf16
    layer = kivi(bits=2)()
    layer.append(k.to(DTYPE), v.to(DTYPE))
    layer.commit()
    q = torch.randn(1, 32, 1, 128, device="cuda", dtype=DTYPE)
    st = layer.store
    ref = reference_decode_attention(q.float(), st.segments[0], st.residual_keys.float(), st.residual_values.float())
    out = st.fused_decode_attention(q)
    assert bool(out.isfinite().all())
    assert float((out.float() - ref).norm() / ref.norm()) < 2e-2
    k[..., 3] = -1e5  # keys too: finite (a channel this large makes the logits themselves coarse in bf16)
    layer = kivi(bits=2)()
    layer.append(k.to(DTYPE), v.to(DTYPE))
    layer.commit()
    assert bool(layer.store.fused_decode_attention(q).isfinite().all())
