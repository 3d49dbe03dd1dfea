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
        if fold and bits == 8:  # the folded kernel takes 2 and 4 bits only
            with pytest.raises(ValueError, match="2 or 4 bits"):
                kivi_decode_attention(q, store, st.residual_keys, st.residual_values, n_splits=splits, fold=fold)
            continue
        out = st.fused_decode_attention(q) if splits is None and not fold else kivi_decode_attention(
            q, store, st.residual_keys, st.residual_values, n_splits=splits, fold=fold)
        assert not out.isnan().any()
        assert float((out.float() - ref).norm() / ref.norm()) < 5e-3
