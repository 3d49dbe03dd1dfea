"""Settings sweep of the fused KIVI kernel of the static decode step (`kernels/kivi_decode.kivi_decode_static`)
against the fp16 slot kernel over the same context (issue 12: "decode 32k, KIVI-2 full cache: faster than fp16").

    python bench/kivi_kernel_sweep.py --context 32768 --block-n 128,256 --num-warps 4,8 --num-stages 0,2,3 \\
        --programs-per-sm 2,4,8 --k-fold 1,0 --v-mode fold,gather,reshape
    python bench/kivi_kernel_sweep.py --quick       # tiny shapes on Triton's CPU interpreter: end-to-end check

Builds `--layers` layers' worth of `StaticKIVI` buffers (Llama-3.1-8B by default: 32 query heads, 8 kv heads,
head_dim 128, 2 bits, G = G_v = 32, residual 32) holding `--context` quantized tokens (random codes, scales and
zeros: timing does not depend on the values) plus a full-precision residual of R tokens, and for every
combination of the settings given (comma lists; num_stages 0 = Triton's default) times one decode step's kernel
calls over all layers: CUDA events around the whole loop, the median of `--reps` (20) after a warm-up, both with
Python launches ("eager ms") and replayed from a CUDA graph ("graph ms", what the compiled step runs). Reference
rows: the fp16 `slot_decode_attention` over the same context (separate (B, HK, context + R, D) buffers per
layer), and the eager fused kernel `kivi_decode_attention` over KIVI's adjacent-token layout (the kernel before the
group-aligned one). Columns: ms for all layers, GB read per step (codes + scales + zeros + residual; K and V at
fp16 for the slot kernel), GB/s over the best of eager / graph, and the kernel's relative error against the
reference path (dequantize + attention, layer 0) -- a wrong setting shows there, not only in the time.
`--json PATH` writes the rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time


def _ints(s):
    return [int(x) for x in s.split(",") if x != ""]


def _strs(s):
    return [x for x in s.split(",") if x != ""]


def _label(o: dict) -> str:
    """Compact settings label: bn=128 w=4 st=- pps=4 kf=1 v=fold."""
    if "block_n" not in o:
        return "-"
    st = "-" if o["num_stages"] is None else o["num_stages"]
    return (f"bn={o['block_n']} w={o['num_warps']} st={st} pps={o['programs_per_sm']} kf={int(o['k_fold'])} "
            f"v={o['v_mode']}")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hk", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--residual", type=int, default=32)
    ap.add_argument("--block-n", type=_ints, default=None, help="comma list; default 2 * the block G * 8 / bits")
    ap.add_argument("--num-warps", type=_ints, default=[4])
    ap.add_argument("--num-stages", type=_ints, default=[0], help="comma list; 0 = Triton's default")
    ap.add_argument("--programs-per-sm", type=_ints, default=[4])
    ap.add_argument("--k-fold", type=_ints, default=[1], help="comma list of 1 / 0")
    ap.add_argument("--v-mode", type=_strs, default=["gather"], help="comma list of fold, gather, reshape")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timing")
    ap.add_argument("--no-reference", action="store_true", help="skip the fp16 and eager-kernel rows")
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes (2 layers, 4/2 heads, d 64, 512 tokens) on Triton's CPU interpreter when no GPU")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.context, a.layers, a.hq, a.hk, a.d, a.reps = 512, 2, 4, 2, 64, 2
        if a.block_n is None:
            a.block_n = [128, 256]
        if a.k_fold == [1] and a.v_mode == ["gather"]:
            a.k_fold, a.v_mode = [1, 0], ["fold", "gather", "reshape"]
    return a


def main(argv=None):
    a = parse(argv)
    import torch

    if a.quick and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by kvsqueeze.kernels)
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from kvsqueeze.kernels.kivi_decode import kivi_decode_attention, kivi_decode_static
    from kvsqueeze.kernels.slot_decode import slot_decode_attention
    from kvsqueeze.quant.kivi import KIVISegment
    from kvsqueeze.quant.kivi_static import StaticKIVI
    from kvsqueeze.quant.packing import PER_CHANNEL, PER_TOKEN, QTensor

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("needs a CUDA GPU (or --quick / TRITON_INTERPRET=1 for Triton's CPU interpreter)")
    dev = "cuda" if cuda else "cpu"
    dt = torch.bfloat16 if cuda else torch.float32
    L, B, HQ, HK, D, bits, G, R = a.layers, a.batch, a.hq, a.hk, a.d, a.bits, a.group, a.residual
    per = 8 // bits
    nq = a.context // G * G
    gen = torch.Generator(device=dev).manual_seed(0)

    s = StaticKIVI(L, B, HK, D, nq + G, bits, G, G, R, dt, dev)
    s.kc.copy_(torch.randint(0, 256, s.kc.shape, dtype=torch.uint8, device=dev, generator=gen))
    s.vc.copy_(torch.randint(0, 256, s.vc.shape, dtype=torch.uint8, device=dev, generator=gen))
    for t, lo, span in ((s.ks, 0.05, 0.5), (s.vs, 0.05, 0.5), (s.kz, -1.0, 0.5), (s.vz, -1.0, 0.5)):
        t.copy_(torch.rand(t.shape, device=dev, generator=gen) * span + lo)
    s.kr.copy_(torch.randn(s.kr.shape, device=dev, generator=gen))
    s.vr.copy_(torch.randn(s.vr.shape, device=dev, generator=gen))
    s.nq.fill_(nq)
    s.nr.fill_(R)
    s.valid[..., :nq] = True
    s.valid[..., s.q_capacity:s.q_capacity + R] = True
    q = torch.randn(B, HQ, D, device=dev, generator=gen).to(dt)
    gv = s.value_group
    q_bytes = B * HK * (2 * nq * D * bits // 8 + 2 * 2 * (nq // G) * D + 2 * 2 * nq * (D // gv)
                        + 2 * R * D * s.kr.element_size())
    fp16_bytes = B * HK * (nq + R) * (2 * D * 2 + 1)

    def timed(step):
        """(eager ms median, graph ms median or None): CUDA events around one call of `step` (all layers)."""
        for _ in range(3 if cuda else 1):
            step()
        if not cuda:
            t0 = time.perf_counter()
            step()
            return (time.perf_counter() - t0) * 1e3, None
        torch.cuda.synchronize()
        ev = []
        for _ in range(a.reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            step()
            e1.record()
            ev.append((e0, e1))
        torch.cuda.synchronize()
        eager = statistics.median(e0.elapsed_time(e1) for e0, e1 in ev)
        if a.no_graph:
            return eager, None
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(g):
            step()
        g.replay()
        torch.cuda.synchronize()
        ev = []
        for _ in range(a.reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            g.replay()
            e1.record()
            ev.append((e0, e1))
        torch.cuda.synchronize()
        return eager, statistics.median(e0.elapsed_time(e1) for e0, e1 in ev)

    q4 = q[:, :, None]
    ref = s.attention(0, q4, None, None)[:, 0].float()

    def rel(out):
        return float((out.float() - ref).norm() / ref.norm())

    rows = []

    def row(name, settings, ms, gb, err):
        best = min(x for x in ms if x is not None)
        rows.append(dict(kernel=name, **settings, eager_ms=ms[0], graph_ms=ms[1], gb=gb, gbps=gb / best * 1e3,
                         rel_err=err))
        r = rows[-1]
        print(f"{name:<14} {_label(settings):<44} {r['eager_ms']:9.3f} "
              f"{'' if r['graph_ms'] is None else format(r['graph_ms'], '9.3f'):>9} {gb:7.3f} {r['gbps']:8.1f} "
              f"{err:9.2e}", flush=True)

    print(f"{L} layers, batch {B}, {HQ}/{HK} heads, d {D}, {bits} bits, G {G}, context {nq} + residual {R}, "
          f"{'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU interpreter'}")
    print(f"{'kernel':<14} {'settings':<44} {'eager ms':>9} {'graph ms':>9} {'GB':>7} {'GB/s':>8} {'rel err':>9}")
    block_ns = a.block_n or [2 * G * per]
    for bn, nw, ns, pps, kf, vm in itertools.product(block_ns, a.num_warps, a.num_stages, a.programs_per_sm,
                                                     a.k_fold, a.v_mode):
        opts = dict(block_n=bn, num_warps=nw, num_stages=ns or None, programs_per_sm=pps, k_fold=bool(kf),
                    v_mode=vm)

        def step(opts=opts):
            for i in range(L):
                kivi_decode_static(q, s.kc[i], s.ks[i], s.kz[i], s.vc[i], s.vs[i], s.vz[i], s.kr[i], s.vr[i],
                                   s.nq[i:i + 1], s.nr[i:i + 1], bits, G, gv, **opts)

        try:
            out = kivi_decode_static(q, s.kc[0], s.ks[0], s.kz[0], s.vc[0], s.vs[0], s.vz[0], s.kr[0], s.vr[0],
                                     s.nq[0:1], s.nr[0:1], bits, G, gv, **opts)
            row("kivi static", opts, timed(step), L * q_bytes / 1e9, rel(out))
        except Exception as e:  # a setting the compiler refuses (e.g. shared memory): report it, go on
            print(f"{'kivi static':<14} {_label(opts):<44} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")

    if not a.no_reference:
        ks = [torch.randn(B, HK, nq + R, D, device=dev, generator=gen).to(dt) for _ in range(L)]
        vs = [torch.randn(B, HK, nq + R, D, device=dev, generator=gen).to(dt) for _ in range(L)]
        valid = torch.ones(B, HK, nq + R, dtype=torch.bool, device=dev)

        def fp16_step():
            for i in range(L):
                slot_decode_attention(q, ks[i], vs[i], valid)

        row("fp16 slots", {}, timed(fp16_step), L * fp16_bytes / 1e9, float("nan"))
        del ks, vs
        # the eager kernel over KIVI's adjacent-token layout (random codes: the same bytes as the static buffers)
        c = lambda t: t.contiguous()  # noqa: E731  (contiguous copies: the eager entry point would copy per call)
        segs = [KIVISegment(QTensor(c(s.kc[i, :, :, :nq // per]), c(s.ks[i, :, :, :nq // G]),
                                    c(s.kz[i, :, :, :nq // G]), bits, PER_CHANNEL, G, D, "token"),
                            QTensor(c(s.vc[i, :, :, :nq // per]), c(s.vs[i, :, :, :nq]), c(s.vz[i, :, :, :nq]), bits,
                                    PER_TOKEN, gv, D, "token"))
                for i in range(L)] if cuda else []
        kr, vr = c(s.kr[:, :, :, :R]), c(s.vr[:, :, :, :R])

        def eager_step():
            for i in range(L):
                kivi_decode_attention(q4, segs[i], kr[i], vr[i])

        if cuda:
            row("kivi eager", {}, timed(eager_step), L * q_bytes / 1e9, float("nan"))
    mine = [r for r in rows if r["kernel"] == "kivi static"]
    if mine:
        key = "graph_ms" if mine[0]["graph_ms"] is not None else "eager_ms"
        best = min(mine, key=lambda r: r[key])
        print(f"fastest kivi static ({key}): {_label(best)}: {best[key]:.3f} ms, {best['gbps']:.0f} GB/s; kwargs "
              f"{ {k: best[k] for k in ('block_n', 'num_warps', 'num_stages', 'programs_per_sm', 'k_fold', 'v_mode')} }")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
