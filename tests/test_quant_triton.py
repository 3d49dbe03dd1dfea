"""The fused Triton KIVI decode kernel against the reference path (runs where CUDA and triton are available)."""

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernel needs a CUDA GPU")

from kvsqueeze.quant import kivi  # noqa: E402
from kvsqueeze.kernels.kivi_decode import kivi_decode_attention, reference_decode_attention  # noqa: E402


@pytest.mark.parametrize("b,hq,hk,d,n,bits,group", [
    (1, 32, 8, 128, 4141, 2, 32), (2, 8, 2, 64, 777, 4, 32), (1, 4, 4, 64, 20, 2, 32), (1, 12, 4, 128, 300, 8, 32),
    (1, 8, 2, 64, 500, 2, 16),
])
def test_fused_kernel_matches_reference(b, hq, hk, d, n, bits, group):
    torch.manual_seed(n)
    layer = kivi(bits=bits, group=group, residual=group)()
    k = torch.randn(b, hk, n, d, device="cuda")
    k[..., :4] *= 8
    layer.append(k.half(), torch.randn(b, hk, n, d, device="cuda").half())
    layer.commit()
    st = layer.store
    q = torch.randn(b, hq, 1, d, device="cuda").half()
    store = st.segments[0] if st.segments else None
    ref = reference_decode_attention(q.float(), store, st.residual_keys.float(), st.residual_values.float())
    for splits, fold in ((None, False), (1, False), (5, False), (None, True), (5, True)):
        out = st.fused_decode_attention(q) if splits is None and not fold else kivi_decode_attention(
            q, store, st.residual_keys, st.residual_values, n_splits=splits, fold=fold)
        assert not out.isnan().any()
        assert float((out.float() - ref).norm() / ref.norm()) < 5e-3


@pytest.mark.parametrize("b,hq,hk,d,n,bits,group,dtype", [
    (1, 32, 8, 128, 4141, 2, 32, torch.float16), (1, 32, 8, 128, 4141, 2, 32, torch.bfloat16),
    (2, 8, 2, 64, 777, 4, 32, torch.float16), (1, 8, 2, 64, 500, 2, 16, torch.bfloat16),
])
def test_static_kernel_matches_reference(b, hq, hk, d, n, bits, group, dtype):
    """The static step's kernel (`kivi_decode_static` over `StaticKIVI`'s group-aligned buffers, every variant and
    two block sizes) against dequantize + attention in float32 over the eager store's codes."""
    from kvsqueeze.quant.kivi_static import StaticKIVI

    torch.manual_seed(n)
    layer = kivi(bits=bits, group=group, residual=group)()
    k = torch.randn(b, hk, n, d, device="cuda")
    k[..., :4] *= 8
    layer.append(k.to(dtype), torch.randn(b, hk, n, d, device="cuda").to(dtype))
    layer.commit()
    st = layer.store
    s = StaticKIVI(1, b, hk, d, st.n + 4 * group, bits, group, group, group, dtype, "cuda")
    s.load(0, st, None)
    q = torch.randn(b, hq, 1, d, device="cuda").to(dtype)
    store = st.segments[0] if st.segments else None
    ref = reference_decode_attention(q.float(), store, st.residual_keys.float(), st.residual_values.float())[:, :, 0]
    tol = 5e-3 if dtype == torch.float16 else 1.5e-2
    for k_fold in (True, False):
        for v_mode in ("fold", "gather", "reshape"):
            for block_n in (None, 4 * group * 8 // bits):
                s.kernel_options = dict(k_fold=k_fold, v_mode=v_mode, block_n=block_n)
                out = s.attention(0, q, None, "triton")
                assert not out.isnan().any()
                err = float((out[:, 0].float() - ref).norm() / ref.norm())
                assert err < tol, (k_fold, v_mode, block_n, err)
