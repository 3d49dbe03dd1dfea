"""AttentionPredictor's CNN over history slabs in one Triton kernel: conv1, ReLU, mask, conv2, ReLU and the 1x1
conv3's weighted channel sum, with no intermediate activation written to memory.

The static AttentionPredictor (`selection/static_attention_predictor.py`, `_z`) computes, per image m (a (row,
query head)) of its history rows x (M, S, W) with validity `ok` (M, S, W):

    f = ReLU(conv2d(x, w1, b1, padding=p)) * ok[crop]          (16 channels; ok cropped to f's centres)
    z = sum_c w3[c] ReLU(conv2d(f, w2, b2, padding=p))[c]      (32 channels -> 1)

with p = (pr, pc) in {0, 1}^2 (pr = 0: no padding along the rows, the slab's output loses two rows at each end).
In torch these are two convolutions, two ReLUs, a multiply and a reduction, each reading and writing activations of
16 or 32 floats per history cell (about 150 MB per layer and step at 32k tokens and 32 query heads). Here one
program computes a block of BLOCK_W output columns of one output row of one image: for each of conv2's 9 taps it
rebuilds the 16 conv1 channels at the shifted positions from x (9 loads of BLOCK_W floats, kept in cache), then
accumulates (BLOCK_W x 16) @ (16 x 32) with `tl.dot`; the 32 channels never leave registers.

Every call of the static step has no row padding and at most 7 rows (3 output rows): the two slabs of the
newest and oldest rows, and the strip, transposed. `_cnn_slab` computes all output rows of a block of columns in
one program: conv1 at each of the 5 rows and 3 column shifts once (15 times 9 loads and 144 products per column),
each added into the up to 3 output rows that read it (`_cnn_rows` builds conv1 27 times for 3 output rows). In
Triton 3.9's sm_90 build it issues 392 global loads for 3 output rows against 272 per row. It is not the default:
`SLAB` stays False until `bench/predictor_cnn.py` times it on a GPU (written in the fifteenth session without one).

`predictor_cnn(x, ok, w1, b1, w2, b2, w3, rows, cols)` is the entry point, a custom operator
(`kvsqueeze::predictor_cnn`) that torch.compile keeps opaque; `reference_predictor_cnn` is the torch computation it
replaces (the tests compare the two). Not wired into the step: its speed on the GPU is not
measured yet (twelfth session; see docs/gpu.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .split_kv import require_triton, tl, triton

_cnn_rows = None  # the Triton kernel: None where triton is not installed
SLAB = False  # slabs without row padding of <= 7 rows through `_cnn_slab` (untimed on a GPU: bench/predictor_cnn.py)

if triton is not None:

    @triton.jit
    def _cnn_rows(X, OK, W1, B1, W2, B2, W3, OUT, S, W, S2, W2N,
                  s_x_m, s_x_s, s_x_w, s_ok_m, s_ok_s, s_ok_w, s_o_m, s_o_s,
                  PR: tl.constexpr, PC: tl.constexpr, BLOCK_W: tl.constexpr, TF32: tl.constexpr):
        m = tl.program_id(0)
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)  # output columns of conv2
        # the output row, as a vector (Triton's interpreter refuses a mask of a vector and a scalar condition)
        r2 = tl.program_id(1) + tl.zeros([BLOCK_W], tl.int32)
        c16 = tl.arange(0, 16)
        c32 = tl.arange(0, 32)
        S1 = S - 2 + 2 * PR  # conv1's output extent
        W1N = W - 2 + 2 * PC
        acc = tl.zeros([BLOCK_W, 32], tl.float32)
        b1 = tl.load(B1 + c16)
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                # conv1's output row and columns feeding this tap (conv2's padding: zero outside)
                f = _conv1_at(X, OK, W1, b1, m, r2 + dy - PR, cols + dx - PC, S, W, S1, W1N, s_x_m, s_x_s, s_x_w,
                              s_ok_m, s_ok_s, s_ok_w, PR, PC, BLOCK_W)
                acc = _tap(acc, f, W2, dy, dx, TF32)
        g = tl.maximum(acc + tl.load(B2 + c32)[None, :], 0.0)
        z = tl.sum(g * tl.load(W3 + c32)[None, :], 1)
        tl.store(OUT + m * s_o_m + tl.program_id(1) * s_o_s + cols, z, mask=cols < W2N)

    @triton.jit
    def _conv1_at(X, OK, W1, b1, m, r1, c1, S, W, S1, W1N, s_x_m, s_x_s, s_x_w, s_ok_m, s_ok_s, s_ok_w,
                  PR: tl.constexpr, PC: tl.constexpr, BLOCK_W: tl.constexpr):
        # conv1's 16 channels at row r1 (a vector of one value) and columns c1 (BLOCK_W,), ReLU, times the
        # validity; zero outside conv1's extent (conv2's zero padding)
        c16 = tl.arange(0, 16)
        inside = (r1 >= 0) & (r1 < S1) & (c1 >= 0) & (c1 < W1N)
        f = tl.zeros([BLOCK_W, 16], tl.float32)
        for ky in tl.static_range(3):
            for kx in tl.static_range(3):
                rx = r1 + ky - PR
                cx = c1 + kx - PC
                ld = inside & (rx >= 0) & (rx < S) & (cx >= 0) & (cx < W)
                xv = tl.load(X + m * s_x_m + rx * s_x_s + cx * s_x_w, mask=ld, other=0.0)
                w = tl.load(W1 + c16 * 9 + ky * 3 + kx)
                f += xv[:, None] * w[None, :]
        okv = tl.load(OK + m * s_ok_m + (r1 + 1 - PR) * s_ok_s + (c1 + 1 - PC) * s_ok_w, mask=inside,
                      other=0).to(tl.float32)  # bool or float validity, read as stored
        return tl.maximum(f + b1[None, :], 0.0) * okv[:, None]

    @triton.jit
    def _tap(acc, f, W2, dy: tl.constexpr, dx: tl.constexpr, TF32: tl.constexpr):
        # acc (BLOCK_W, 32) + f (BLOCK_W, 16) @ conv2's tap (dy, dx) (16, 32). TF32: an int flag, not a string
        # constexpr (what torch.compile's Triton wrapper passes safely)
        c16 = tl.arange(0, 16)
        c32 = tl.arange(0, 32)
        w2 = tl.load(W2 + c32[None, :] * 144 + c16[:, None] * 9 + dy * 3 + dx)  # (16, 32)
        if TF32:
            return acc + tl.dot(f, w2, input_precision="tf32")
        return acc + tl.dot(f, w2, input_precision="ieee")

    @triton.jit
    def _cnn_slab(X, OK, W1, B1, W2, B2, W3, OUT, S, W, S2, W2N,
                  s_x_m, s_x_s, s_x_w, s_ok_m, s_ok_s, s_ok_w, s_o_m, s_o_s,
                  PC: tl.constexpr, BLOCK_W: tl.constexpr, TF32: tl.constexpr):
        # a slab without row padding and at most 3 output rows (S <= 7): one program computes every output row of
        # a block of columns, each conv1 row's channels (5 rows x 3 column shifts) once for the up to 3 output
        # rows that read them (`_cnn_rows` rebuilds them for each of the 9 taps of each output row)
        m = tl.program_id(0)
        cols = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        zero = tl.zeros([BLOCK_W], tl.int32)
        S1 = S - 2
        W1N = W - 2 + 2 * PC
        b1 = tl.load(B1 + tl.arange(0, 16))
        acc0 = tl.zeros([BLOCK_W, 32], tl.float32)
        acc1 = tl.zeros([BLOCK_W, 32], tl.float32)
        acc2 = tl.zeros([BLOCK_W, 32], tl.float32)
        for rho in tl.static_range(5):  # conv1 row; output row j reads it through tap dy = rho - j
            for dx in tl.static_range(3):
                f = _conv1_at(X, OK, W1, b1, m, zero + rho, cols + dx - PC, S, W, S1, W1N, s_x_m, s_x_s, s_x_w,
                              s_ok_m, s_ok_s, s_ok_w, 0, PC, BLOCK_W)
                if rho <= 2:
                    acc0 = _tap(acc0, f, W2, rho, dx, TF32)
                if rho >= 1 and rho <= 3:
                    acc1 = _tap(acc1, f, W2, rho - 1, dx, TF32)
                if rho >= 2:
                    acc2 = _tap(acc2, f, W2, rho - 2, dx, TF32)
        b2 = tl.load(B2 + tl.arange(0, 32))
        w3 = tl.load(W3 + tl.arange(0, 32))
        out = OUT + m * s_o_m + cols
        okc = cols < W2N
        n2 = zero + S2  # output rows, as a vector (the interpreter refuses a vector and a scalar in one mask)
        tl.store(out, tl.sum(tl.maximum(acc0 + b2[None, :], 0.0) * w3[None, :], 1), mask=okc & (n2 > 0))
        tl.store(out + s_o_s, tl.sum(tl.maximum(acc1 + b2[None, :], 0.0) * w3[None, :], 1), mask=okc & (n2 > 1))
        tl.store(out + 2 * s_o_s, tl.sum(tl.maximum(acc2 + b2[None, :], 0.0) * w3[None, :], 1),
                 mask=okc & (n2 > 2))


def predictor_cnn(x: torch.Tensor, ok: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                  b2: torch.Tensor, w3: torch.Tensor, rows: bool = True, cols: bool = True, block_w: int = 64,
                  precision: str = "ieee", kernel: str | None = None) -> torch.Tensor:
    """The CNN's contribution z (M, S', W') float32 of history rows x (M, S, W) float32 (zero where not `ok`) with
    validity ok (M, S, W) (bool or float; or any shape that broadcasts to x's, e.g. (1, S, W) for every image):
    `reference_predictor_cnn`'s value in one kernel. w1 (16, 1, 3, 3), b1
    (16,), w2 (32, 16, 3, 3), b2 (32,), w3 (32,): `PredictorNet`'s conv1, conv2 and conv3 (float32). `rows` /
    `cols` False: no padding along that axis (S' = S - 4, W' = W - 4; else S, W). `precision`: `tl.dot`'s input
    precision ("ieee": float32 products; "tf32" on the GPU: tensor cores, as cuDNN's default for float32
    convolutions). `kernel`: "rows" (`_cnn_rows`: one program per output row and block of columns), "slab"
    (`_cnn_slab`: every output row of a block of columns in one program, each conv1 row built once; only for
    `rows` False and S <= 7, the static step's slabs and strip), default "slab" where it applies and `SLAB` is set,
    else "rows"; the same value. Raises RuntimeError without triton, ValueError for other channel counts,
    precisions or kernels, or "slab" where it does not apply."""
    require_triton("the predictor CNN kernel")
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    fits = not rows and x.shape[1] <= 7
    if kernel not in (None, "rows", "slab") or (kernel == "slab" and not fits):
        raise ValueError(f"kernel must be 'rows' or 'slab' (rows=False and at most 7 rows only), got {kernel!r} "
                         f"for rows={rows} and {x.shape[1]} rows")
    slab = kernel == "slab" or (kernel is None and SLAB and fits)
    if tuple(w1.shape) != (16, 1, 3, 3) or tuple(w2.shape) != (32, 16, 3, 3) or w3.numel() != 32:
        raise ValueError(f"the predictor CNN kernel takes PredictorNet's 1 -> 16 -> 32 -> 1 channels, got conv1 "
                         f"{tuple(w1.shape)}, conv2 {tuple(w2.shape)}, conv3 {w3.numel()}")
    return _cnn_op(x, ok, w1, b1, w2, b2, w3, bool(rows), bool(cols), int(block_w), precision == "tf32", slab)


def _out_shape(x: torch.Tensor, rows: bool, cols: bool) -> tuple[int, int, int]:
    M, S, W = x.shape
    return M, max(S - 4 + 4 * int(rows), 0), max(W - 4 + 4 * int(cols), 0)


# One opaque operator for torch.compile: inductor calls the launch below as an extern kernel instead of tracing the
# Triton kernel (its analysis of a user-defined kernel ran for minutes on the static step's 90 call sites per
# token in the thirteenth session's GPU run); CUDA graphs capture the launch as any other.
@torch.library.custom_op("kvsqueeze::predictor_cnn", mutates_args=())
def _cnn_op(x: torch.Tensor, ok: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor, w3: torch.Tensor, rows: bool, cols: bool, block_w: int, tf32: bool,
            slab: bool = False) -> torch.Tensor:
    M, S, W = x.shape
    _, S2, W2 = _out_shape(x, rows, cols)
    x = x if x.dtype == torch.float32 else x.float()  # read through its strides: a transposed view costs no copy
    okf = ok.expand(M, S, W)  # bool or float; may broadcast over the images (stride 0)
    out = torch.empty(M, S2, W2, dtype=torch.float32, device=x.device)
    if S2 == 0 or W2 == 0 or M == 0:
        return out
    weights = (w1.float().contiguous(), b1.float().contiguous(), w2.float().contiguous(), b2.float().contiguous(),
               w3.float().contiguous().view(-1))
    strides = (x.stride(0), x.stride(1), x.stride(2), okf.stride(0), okf.stride(1), okf.stride(2), out.stride(0),
               out.stride(1))
    if slab:
        _cnn_slab[(M, 1, triton.cdiv(W2, block_w))](x, okf, *weights, out, S, W, S2, W2, *strides, PC=int(cols),
                                                      BLOCK_W=block_w, TF32=int(tf32), num_warps=4)
        return out
    _cnn_rows[(M, S2, triton.cdiv(W2, block_w))](x, okf, *weights, out, S, W, S2, W2, *strides, PR=int(rows),
                                                  PC=int(cols), BLOCK_W=block_w, TF32=int(tf32), num_warps=4)
    return out


@_cnn_op.register_fake
def _(x, ok, w1, b1, w2, b2, w3, rows, cols, block_w, tf32, slab=False):
    return x.new_empty(_out_shape(x, rows, cols), dtype=torch.float32)


def reference_predictor_cnn(x: torch.Tensor, ok: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                            w2: torch.Tensor, b2: torch.Tensor, w3: torch.Tensor, rows: bool = True,
                            cols: bool = True) -> torch.Tensor:
    """`predictor_cnn` in torch (the static AttentionPredictor's `_z`): x, ok (M, S, W) -> z (M, S', W')."""
    pad = (int(rows), int(cols))
    f = torch.relu(F.conv2d(x[:, None], w1, b1, padding=pad))
    f = f * ok[:, None, 1 - pad[0] : ok.shape[1] - 1 + pad[0], 1 - pad[1] : ok.shape[2] - 1 + pad[1]]
    f = torch.relu(F.conv2d(f, w2, b2, padding=pad))
    return (f * w3.view(1, -1, 1, 1)).sum(1)
