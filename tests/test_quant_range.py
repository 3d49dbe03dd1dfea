"""Quantized storage holds any finite value (issue 9, item 4): every scheme, every bit width, fp32 / bf16 / fp16.

fp32 and bf16 models can hold values beyond float16's 65504; a scale, zero point, low-rank factor or outlier kept in
float16 then comes back as inf. Inputs here have one channel near +BIG and one near -BIG (1e5 in fp32 / bf16,
just under float16's limit in fp16, where a group's *range* is twice that).
"""

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import H2O
from kvsqueeze.quant import parse_quant
from kvsqueeze.quant.gear import compress_part
from kvsqueeze.methods import ZipCacheSaliency, for_storage
from kvsqueeze.quant.mikv import MixedPrecisionStore
from kvsqueeze.quant.packing import quantize

from conftest import kv, tiny_llama

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BIG = {torch.float32: 1e5, torch.bfloat16: 1e5, torch.float16: 6e4}
BITS = [1, 2, 4, 8]
# every scheme at every bit width it accepts (mixed: every hi and every lo width, 16 = unquantized)
SPECS = ([f"kivi-{b}" for b in BITS] + [f"gear-{b}" for b in BITS]
         + [f"{s}-{hi}-{lo}" for s in ("mikv", "zipcache") for hi, lo in ((16, 1), (8, 2), (4, 4), (2, 8))])


def _wide(dtype, n=96, d=64, seed=0):
    """(1, 2, n, d) standard normal values, channel 3 near +BIG and channel 20 near -BIG (one group of 32), finite in dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, n, d, generator=g)
    big = BIG[dtype]
    x[..., 3] = big * (0.9 + 0.05 * torch.rand(1, 2, n, generator=g))
    x[..., 20] = -big * (0.9 + 0.05 * torch.rand(1, 2, n, generator=g))
    x = x.to(dtype)
    assert bool(x.isfinite().all())
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("axis", ["per_channel", "per_token"])
def test_quantize_holds_any_finite_range_within_half_a_step(dtype, bits, axis):
    x = _wide(dtype, n=64)
    q = quantize(x, bits, axis, 32)
    y = q.dequantize(dtype)
    assert y.dtype == dtype and bool(y.isfinite().all())
    xf = x.float()
    if axis == "per_channel":
        g = xf.view(1, 2, 2, 32, 64)
        lo, hi = g.amin(3, keepdim=True), g.amax(3, keepdim=True)
    else:
        g = xf.view(1, 2, 64, 2, 32)
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    # half a step (bf16 zero rounded down, scale rounded up: packing.py), plus the output dtype's own rounding
    step = (hi - lo + lo.abs() * 2**-7) * (1 + 2**-7) / (2**bits - 1)
    bound = (step / 2).expand_as(g).reshape_as(xf) + xf.abs() * torch.finfo(dtype).eps + 1e-6
    assert bool(((y.float() - xf).abs() <= bound).all())


def _layer(spec, dtype, k, v):
    """Fill a scheme's layer with k, v as a prefill would (mixed layers split by random scores, half kept high)."""
    layer = parse_quant(spec).layer_factory()
    keys, values = layer.update(k, v)  # held: the split reads this live, full-precision view
    if isinstance(layer.store, MixedPrecisionStore):
        scores = torch.rand(layer.positions.shape, generator=torch.Generator().manual_seed(1))
        layer.split(scores, layer.n_stored // 2)
    layer.commit()
    del keys, values
    assert layer.store.n_compressed > 0
    return layer


def _orig(layer, x):
    """The input tokens in the layer's slot order (mixed layers reorder slots)."""
    idx = layer.positions.long()[..., None].expand(*layer.positions.shape, x.shape[-1])
    return x.gather(2, idx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SPECS)
def test_every_scheme_returns_finite_close_values(spec, dtype):
    k, v = _wide(dtype, seed=0), _wide(dtype, seed=1)
    layer = _layer(spec, dtype, k, v)
    lo_bits = min(int(b) for b in spec.split("-")[1:])  # the coarsest precision held
    for got, x in ((layer.keys, k), (layer.values, v)):
        assert got.dtype == dtype and bool(got.isfinite().all()), spec
        x = _orig(layer, x).float()
        err = (got.float() - x).abs()
        # at most one step of the coarsest precision over the head's whole range (every group lies inside it),
        # and the wide channels themselves within that step of their value
        # (plus the output dtype's own rounding of each value)
        rng = (x.amax(dim=(2, 3), keepdim=True) - x.amin(dim=(2, 3), keepdim=True))
        out = x.abs() * torch.finfo(dtype).eps
        assert bool((err <= rng / (2**lo_bits - 1) + out).all()), (spec, float(err.max()))
        wide = err[..., [3, 20]] - out[..., [3, 20]]
        assert bool((wide <= rng / (2**lo_bits - 1) / 2 * 1.05).all()), (spec, float(err.max()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", BITS)
def test_gear_outliers_come_back_bit_exact(dtype, bits):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 64, 64, generator=g)
    x[0, 0, 5, 9] = 0.7712345 * BIG[dtype]  # a lone outlier beyond float16's range (fp32 / bf16)
    x[0, 1, 7, 2] = -1234.5678  # and one float16 cannot hold exactly
    x = x.to(dtype)
    for axis in ("per_channel", "per_token"):
        p = compress_part(x, bits, axis, 32, rank=2, outlier_ratio=0.02)
        y = p.decode(dtype)
        assert bool(y.isfinite().all())
        idx = p.out_idx.long()
        assert torch.equal(y.gather(-1, idx), x.gather(-1, idx))  # every kept outlier, bit-exact
        assert y[0, 0, 5, 9] == x[0, 0, 5, 9] and y[0, 1, 7, 2] == x[0, 1, 7, 2]
        assert p.out_val.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", ["mikv", "zipcache"])
def test_mixed_16_bit_part_is_the_input_itself(dtype, scheme):
    k, v = _wide(dtype, seed=3), _wide(dtype, seed=4)
    layer = _layer(f"{scheme}-16-2", dtype, k, v)
    n_lo = layer.store.n_low
    assert 0 < n_lo < layer.n_stored
    assert torch.equal(layer.keys[:, :, n_lo:], _orig(layer, k)[:, :, n_lo:])
    assert torch.equal(layer.values[:, :, n_lo:], _orig(layer, v)[:, :, n_lo:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_with_huge_values_gives_finite_logits_with_every_scheme(dtype):
    model = tiny_llama(layers=2)
    with torch.no_grad():  # values of ~1e5..6e5 (fp32 / bf16) or ~6e4 (fp16)
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(1e6 if dtype != torch.float16 else 1e5)
    model = model.to(dtype)
    ids = torch.randint(0, 101, (1, 100), generator=torch.Generator().manual_seed(0))
    for spec in SPECS:
        q = parse_quant(spec)
        base = ZipCacheSaliency(compression_ratio=0.5) if spec.startswith("zipcache") else H2O(compression_ratio=0.5)
        method = for_storage(base, q) if spec.startswith(("mikv", "zipcache")) else None
        cache = kq.CompressedCache(model, method, layer_factory=q.layer_factory)
        with torch.no_grad():
            model(ids, **kv(cache))
            assert max(float(layer.store.residual_values.float().abs().max()) for layer in cache.layers) > BIG[dtype] * 0.9
            logits = model(ids[:, :1], **kv(cache)).logits  # attends to the quantized tokens
        assert bool(logits.isfinite().all()), (spec, dtype)
