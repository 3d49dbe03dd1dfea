"""The fused predictor CNN kernel (kernels/predictor_cnn.py) against the torch convolutions it replaces: the
static AttentionPredictor's slabs (no row padding), strips (no column padding) and whole histories, masked cells,
widths that are not a multiple of the block. Runs on CUDA, or on the CPU under Triton's interpreter
(TRITON_INTERPRET=1)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")

from kvsqueeze.kernels.predictor_cnn import predictor_cnn, reference_predictor_cnn  # noqa: E402
from kvsqueeze.selection import PredictorNet  # noqa: E402

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CUDA or TRITON_INTERPRET=1 needed")
DEV = "cuda" if CUDA else "cpu"


@pytest.mark.parametrize("rows,cols,S,W,kernel", [(False, True, 7, 37, None), (False, True, 6, 64, None),
                                                  (True, False, 9, 7, None), (True, True, 8, 20, None),
                                                  (False, True, 7, 37, "slab"), (False, True, 6, 64, "slab"),
                                                  (False, False, 7, 21, "slab"), (False, True, 5, 19, "slab")])
def test_fused_cnn_equals_the_convolutions(rows, cols, S, W, kernel):
    """Both kernels: per output row (`_cnn_rows`, the default) and per slab (`_cnn_slab`: at most 3 output rows
    in one program, no row padding), with and without column padding."""
    torch.manual_seed(S * W)
    net = PredictorNet()
    w1, b1 = net.conv1.weight.detach(), net.conv1.bias.detach()
    w2, b2 = net.conv2.weight.detach(), net.conv2.bias.detach()
    w3 = net.conv3.weight.detach()[0, :, 0]
    g = torch.Generator().manual_seed(W)
    ok = torch.rand(5, S, W, generator=g) < 0.8
    x = (torch.rand(5, S, W, generator=g) ** 4) * ok
    args = [t.to(DEV) for t in (x, ok, w1, b1, w2, b2, w3)]
    got = predictor_cnn(*args, rows=rows, cols=cols, block_w=16, kernel=kernel)
    want = reference_predictor_cnn(*args, rows=rows, cols=cols)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # a validity shared by every image (the static AttentionPredictor's load passes (1, S, W)): broadcast, not read
    # past its end
    shared = ok[:1].to(DEV)
    args = [t.to(DEV) for t in (x * ok[:1], shared, w1, b1, w2, b2, w3)]
    torch.testing.assert_close(predictor_cnn(*args, rows=rows, cols=cols, block_w=16, kernel=kernel),
                               reference_predictor_cnn(*args, rows=rows, cols=cols), atol=1e-5, rtol=1e-4)


def test_the_slab_kernel_is_refused_where_it_does_not_apply():
    net = PredictorNet()
    w = [net.conv1.weight.detach(), net.conv1.bias.detach(), net.conv2.weight.detach(), net.conv2.bias.detach(),
         net.conv3.weight.detach()[0, :, 0]]
    w = [t.to(DEV) for t in w]
    x = torch.rand(2, 8, 20, device=DEV)
    with pytest.raises(ValueError, match="slab"):
        predictor_cnn(x, x > 0, *w, rows=False, cols=True, kernel="slab")  # 8 rows: 4 output rows
    with pytest.raises(ValueError, match="slab"):
        predictor_cnn(x[:, :7], x[:, :7] > 0, *w, rows=True, cols=True, kernel="slab")  # row padding
    with pytest.raises(ValueError, match="kernel"):
        predictor_cnn(x, x > 0, *w, kernel="cudnn")


def test_static_attention_predictor_with_the_fused_cnn_predicts_the_same_scores():
    """The static AttentionPredictor with cnn="fused" (the kernel) predicts the scores it does with cnn="torch"
    over 6 steps of a random history (within float rounding: pages with equal scores may then be taken in another
    order, so the pages must agree on most steps, not all), and keeps the same z rows."""
    from kvsqueeze.selection import AttentionPredictor
    from kvsqueeze.selection.static_attention_predictor import StaticAttentionPredictor
    from kvsqueeze.storage.static import StaticSlots

    b, hk, hq, d, n0, cap = 1, 2, 4, 16, 100, 160
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(b, hk, n0 + 6, d, generator=g).to(DEV)
    hist = torch.rand(b, hq, 12, 7, generator=g) ** 4
    queries = [torch.randn(b, hq, 1, d, generator=g).to(DEV) for _ in range(6)]
    runs = []
    for cnn in ("torch", "fused"):
        torch.manual_seed(3)
        sel = AttentionPredictor(64, predictor=PredictorNet(), sink=16, local=16, history=16, dense_layers=())
        sel.state[0] = {"hist": hist.clone(), "n": n0}
        slots = StaticSlots(1, b, hk, cap, d, torch.float32, DEV)
        slots.load(0, keys[:, :, :n0], keys[:, :, :n0], torch.arange(n0, device=DEV).expand(b, hk, -1), None)
        sap = StaticAttentionPredictor(sel, slots, hq, cnn=cnn)
        sap.load(sel, [n0])
        preds, pages = [], []
        predict = sap._predict
        sap._predict = lambda *a, predict=predict, preds=preds: preds.append(predict(*a)) or preds[-1]
        for s, q in enumerate(queries):
            n = n0 + s + 1
            slots.keys[0][:, :, n - 1] = keys[:, :, n - 1]
            slots.valid[0][:, :, n - 1] = True
            slots.write[0] = n - 1
            sap.host_step()
            p = sap.select(0, q, 0.25)
            sap.observe(0, q, 0.25, p)
            sap.after_step()
            pages.append(p.clone())
        runs.append((preds, pages, sap.z[0][..., :-1].clone()))
    (s1, p1, z1), (s2, p2, z2) = runs
    assert len(s1) == len(s2) == 6
    # on CUDA both paths take TF32 products (cuDNN's default, which the kernel follows): rounding near 1e-3 relative
    # (the H200, fourteenth session: 2.6e-5 absolute, 0.7% relative on a small score)
    tol = dict(atol=2e-4, rtol=2e-2) if CUDA and torch.backends.cudnn.allow_tf32 else dict(atol=1e-5, rtol=1e-4)
    for a, c in zip(s1, s2):
        torch.testing.assert_close(a, c, **tol)
    assert sum(torch.equal(a, c) for a, c in zip(p1, p2)) >= 4
    torch.testing.assert_close(z1, z2, **tol)


def test_the_fused_cnn_is_one_opaque_operator_under_torch_compile():
    """torch.compile traces `predictor_cnn` as one custom operator (`kvsqueeze::predictor_cnn`) with no graph break
    (fullgraph), its fake (meta) shapes match the launch's (torch.library.opcheck), and the compiled call equals
    the eager one. Inductor then never analyses the Triton kernel (the static step's slow compile, fourteenth
    session)."""
    torch.manual_seed(0)
    net = PredictorNet()
    w = [net.conv1.weight.detach(), net.conv1.bias.detach(), net.conv2.weight.detach(), net.conv2.bias.detach(),
         net.conv3.weight.detach()[0, :, 0]]
    x = torch.rand(2, 7, 20)
    ok = torch.ones(1, 7, 20)
    args = [t.to(DEV) for t in (x, ok, *w)]
    torch.library.opcheck(torch.ops.kvsqueeze.predictor_cnn.default, (*args, False, True, 16, False),
                          test_utils=("test_schema", "test_faketensor"))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    fn = torch.compile(lambda *a: predictor_cnn(*a, rows=False, cols=True, block_w=16) * 2.0, backend=backend,
                       fullgraph=True)
    got = fn(*args)
    assert len(graphs) == 1
    targets = [n.target for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert torch.ops.kvsqueeze.predictor_cnn.default in targets
    torch.testing.assert_close(got, predictor_cnn(*args, rows=False, cols=True, block_w=16) * 2.0)


@pytest.mark.parametrize("rows,cols", [(True, False), (False, True)])
def test_strided_and_bool_inputs_and_the_transposed_strip(rows, cols):
    """The kernel reads x through its strides (a transposed view: no copy) and a bool validity as stored, and a
    strip (rows padded, columns not: the static AttentionPredictor's last columns, (N, H, 7)) computed on its
    transpose with transposed filters equals the convolutions of the strip itself."""
    torch.manual_seed(1)
    net = PredictorNet()
    w1, b1 = net.conv1.weight.detach(), net.conv1.bias.detach()
    w2, b2 = net.conv2.weight.detach(), net.conv2.bias.detach()
    w3 = net.conv3.weight.detach()[0, :, 0]
    g = torch.Generator().manual_seed(2)
    ok = torch.rand(3, 21, 7, generator=g) < 0.8  # (N, H, 7): a strip
    x = (torch.rand(3, 21, 7, generator=g) ** 4) * ok
    want = reference_predictor_cnn(x, ok.float(), w1, b1, w2, b2, w3, rows=rows, cols=cols)
    xd, okd = x.to(DEV), ok.to(DEV)
    dev_w = [t.to(DEV) for t in (w1, b1, w2, b2, w3)]
    # as it is (bool ok), and through the transpose (strided views of x and ok, transposed filters)
    got = predictor_cnn(xd, okd, *dev_w, rows=rows, cols=cols, block_w=16)
    wt1, wt2 = dev_w[0].transpose(-1, -2).contiguous(), dev_w[2].transpose(-1, -2).contiguous()
    got_t = predictor_cnn(xd.transpose(1, 2), okd.transpose(1, 2), wt1, dev_w[1], wt2, dev_w[3], dev_w[4],
                          rows=cols, cols=rows, block_w=16).transpose(1, 2)
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_t.cpu(), want, atol=1e-5, rtol=1e-4)


_COMPILE = """import sys
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvsqueeze.kernels import predictor_cnn as C

ok_t, tf32, kernel = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sig = {"X": "*fp32", "OK": ok_t, "W1": "*fp32", "B1": "*fp32", "W2": "*fp32", "B2": "*fp32", "W3": "*fp32",
       "OUT": "*fp32"}
sig.update({n: "i32" for n in ("S", "W", "S2", "W2N", "s_x_m", "s_x_s", "s_x_w", "s_ok_m", "s_ok_s", "s_ok_w",
                               "s_o_m", "s_o_s")})
consts = {"PR": 0, "PC": 1, "BLOCK_W": 64, "TF32": tf32}
if kernel == "slab":
    del consts["PR"]
sig.update({name: "constexpr" for name in consts})
fn = C._cnn_slab if kernel == "slab" else C._cnn_rows
k = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 4})
print("cubin", len(k.asm["cubin"]))
"""


@pytest.mark.parametrize("ok_type,tf32,kernel", [("*i1", 1, "rows"), ("*i1", 0, "rows"), ("*fp32", 1, "rows"),
                                                ("*i1", 1, "slab")])
def test_the_kernel_compiles_for_sm90(ok_type, tf32, kernel):
    """The kernels through Triton's whole compiler for an H100/H200 (sm_90: TTIR to cubin, no GPU needed; in a
    subprocess without TRITON_INTERPRET), with the validity as stored (bool: `*i1`) or float, TF32 or float32
    products: what the interpreter lets through (an unsupported load or dot on the device) fails here. The
    fourteenth session changed the loads (strided x, bool validity) after its last GPU run."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE, ok_type, str(tf32), kernel], capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode != 0 and ("ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr):
        pytest.skip(f"this triton cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 0
