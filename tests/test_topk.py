"""The top-k kernels (kernels/topk.py, algo "search", "sample" and "split"): the k largest of each row in increasing order,
ties at the k-th value to the lowest indices, against torch.topk. The kernels run on CUDA, or on the CPU under
Triton's interpreter (TRITON_INTERPRET=1); the fallback and the argument checks everywhere. The sample and split
variants are also checked on rows that force their full-row fallback, and on rows where they must not take it."""

import os

import pytest
import torch

from kvsqueeze.kernels import topk
from kvsqueeze.kernels.split_kv import triton
from kvsqueeze.kernels.topk import (kernel_applies, reference_topk_increasing, resolve_algo, sample_fallbacks,
                                   sample_plan, topk_increasing)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
kernel_runs = pytest.mark.skipif(triton is None or (not CUDA and os.environ.get("TRITON_INTERPRET") != "1"),
                                 reason="needs triton (not in the CPU venv), and CUDA or TRITON_INTERPRET=1")


def _rule(x: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's rule in plain torch, one row at a time: the k largest, ties to the lowest index (a stable
    descending sort), NaN as -inf, increasing order."""
    x = torch.nan_to_num(x.float(), nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def _rows(seed: int, rows: int, P: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(rows, P, generator=g)
    if ties:  # few distinct values, infinities, NaN, both zeros
        x = (x * 6).floor() / 6 - 0.5
        x[0, ::7] = float("-inf")
        x[-1, 3::11] = float("inf")
        x[:, 5::13] = -0.0
        x[:, 2::17] = 0.0
        x[1 % rows, 1::19] = float("nan")
    return x


ALGOS = [("search", None), ("sample", None), ("sample", 64), ("split", None), ("split", 64)]  # (algo, sample size)
SAMPLED = ["sample", "split"]  # the variants with a pivot from a sample, and a fallback


@kernel_runs
@pytest.mark.parametrize("P,k", [(8200, 256), (2048, 128), (1000, 37), (37, 37), (16, 1), (300, 299)])
@pytest.mark.parametrize("ways,tile", [(2, 2048), (4, 256), (16, 64)])
@pytest.mark.parametrize("algo,sample", ALGOS)
def test_kernel_equals_the_rule(P, k, ways, tile, algo, sample):
    for ties in (False, True):
        x = _rows(P + k + ways, 3, P, ties).to(DEV)
        got = topk_increasing(x, k, ways=ways, tile=tile, algo=algo, sample=sample)
        assert got.shape == (3, k) and got.dtype == torch.long
        torch.testing.assert_close(got.cpu(), _rule(x.cpu(), k), rtol=0, atol=0)


@kernel_runs
@pytest.mark.parametrize("algo,sample", ALGOS)
def test_kernel_takes_bf16_and_batched_shapes_and_equals_torch_topk_without_ties(algo, sample):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 3000, generator=g).to(DEV)  # (b, kv heads, pages): distinct values
    got = topk_increasing(x, 96, algo=algo, sample=sample)
    assert got.shape == (2, 8, 96)
    torch.testing.assert_close(got.cpu(), reference_topk_increasing(x.cpu(), 96), rtol=0, atol=0)
    xb = x.to(torch.bfloat16)  # bf16: many ties
    torch.testing.assert_close(topk_increasing(xb, 96, algo=algo, sample=sample).cpu(), _rule(xb.cpu(), 96),
                               rtol=0, atol=0)


def test_fallback_and_errors():
    x = torch.randn(4, 50)
    if not kernel_applies(x):
        torch.testing.assert_close(topk_increasing(x, 5), reference_topk_increasing(x, 5))
    with pytest.raises(ValueError, match="outside"):
        topk_increasing(x, 51)
    with pytest.raises(ValueError, match="outside"):
        topk_increasing(x, 0)
    with pytest.raises(ValueError, match="power of two"):
        topk_increasing(x, 3, ways=3)
    with pytest.raises(ValueError, match="tile"):
        topk_increasing(x, 3, tile=100)
    with pytest.raises(ValueError, match="algo"):
        topk_increasing(x, 3, algo="radix")
    with pytest.raises(ValueError, match="sample"):
        topk_increasing(x, 3, algo="sample", sample=1000)
    with pytest.raises(ValueError, match="segment"):
        topk_increasing(x, 3, algo="split", segment=100)
    with pytest.raises(ValueError, match="no fallback"):
        sample_fallbacks(x, 3, algo="search")


def test_auto_takes_split_for_long_rows(monkeypatch):
    """ALGO "auto" (the default): "split" from SPLIT_FROM scores on, "sample" below; a named kernel passes."""
    monkeypatch.setattr(topk, "ALGO", "auto")
    assert resolve_algo(topk.SPLIT_FROM) == "split"
    assert resolve_algo(topk.SPLIT_FROM - 1) == "sample"
    assert resolve_algo(topk.SPLIT_FROM, "search") == "search"
    monkeypatch.setattr(topk, "ALGO", "sample")
    assert resolve_algo(10 * topk.SPLIT_FROM) == "sample"


@kernel_runs
def test_default_kernel_equals_the_rule_on_both_sides_of_split_from(monkeypatch):
    monkeypatch.setattr(topk, "ALGO", "auto")
    for P in (topk.SPLIT_FROM - 1, topk.SPLIT_FROM + 5):
        x = _quest_rows(5, 2, P)
        torch.testing.assert_close(topk_increasing(x.to(DEV), 128).cpu(), _rule(x, 128), rtol=0, atol=0)


def test_rule_helper_breaks_ties_to_the_lowest_index():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, float("nan")]])
    assert _rule(x, 2).tolist() == [[1, 2]]
    assert _rule(x, 4).tolist() == [[1, 2, 3, 4]]


@kernel_runs
@pytest.mark.parametrize("algo,sample", ALGOS)
def test_kernel_at_the_infinities(algo, sample):
    """The search starts on the finite range: k within the +inf scores, k reaching into the -inf ones, no finite
    score at all."""
    x = torch.full((4, 300), float("-inf"))
    x[0, 10:20] = torch.arange(10.0)  # 10 finite, k = 15 takes 5 of the -inf scores (the lowest indices)
    x[1, 50:55] = float("inf")  # k = 15 > 5 +inf: the rest from the finite ones
    x[1, 100:200] = torch.rand(100)
    x[2, 7::30] = float("inf")  # 10 +inf, k = 15: 5 from -inf
    x[3, ::2] = float("inf")  # 150 +inf >= k: the first 15 of them
    for k in (1, 15, 300):
        got = topk_increasing(x.to(DEV), k, algo=algo, sample=sample).cpu()
        torch.testing.assert_close(got, _rule(x, k), rtol=0, atol=0)


def _quest_rows(seed: int, rows: int, P: int) -> torch.Tensor:
    """Scores like Quest's (bench/topk.py): a softmax over the pages, -inf for the last 8, +inf for one."""
    g = torch.Generator().manual_seed(seed)
    x = torch.softmax(torch.randn(rows, P, generator=g) * 3, -1)
    x[:, -8:] = float("-inf")
    x[:, -9] = float("inf")
    return x


@kernel_runs
@pytest.mark.parametrize("algo", SAMPLED)
@pytest.mark.parametrize("P,k,sample", [(8200, 256, None), (8200, 256, 512), (2056, 128, None), (20000, 64, 256)])
def test_sample_variant_takes_its_fast_path_on_quest_rows(P, k, sample, algo):
    """On Quest-like rows the sample's pivot brackets the k-th: no row falls back, and the output is the rule's;
    also with fine ties (about 4 copies of each value, so ties at the k-th) and many rows."""
    x = _quest_rows(P + k, 16, P)
    fine = torch.floor(torch.rand(3, P, generator=torch.Generator().manual_seed(1)) * (P // 4)) / (P // 4)
    for rows in (x, fine):
        got, fell = sample_fallbacks(rows.to(DEV), k, sample=sample, algo=algo)
        assert not fell.any()
        torch.testing.assert_close(got.cpu(), _rule(rows, k), rtol=0, atol=0)


def _adversarial(P: int, k: int, sample: int | None) -> torch.Tensor:
    """Rows on which the sample misleads the pivot, each forcing the fallback: (0) every score equal but a few
    (the compacted scores would be the whole row), (1) the sample's positions hold the row's largest scores (fewer
    than k scores reach the pivot), (2) they hold the smallest (more than the buffer reach it), (3) 3000 copies of the
    k-th value under 200 distinct larger ones (the copies overflow the buffer), (4) like (2) with four values, NaN
    and +inf (ties at the k-th)."""
    S, ra, rb, cap = sample_plan(P, k, sample)
    assert P > S and cap < P  # the fallback is reachable
    pick = torch.arange(S) * P // S
    g = torch.Generator().manual_seed(P + k)
    x = torch.rand(5, P, generator=g)
    x[0] = 1.0
    x[0, ::97] = 2.0
    x[1, pick] = 10 + torch.rand(S, generator=g)
    x[2] += 10
    x[2, pick] = torch.rand(S, generator=g)
    x[3, torch.randperm(P, generator=g)[:3000]] = 5.0
    x[3, torch.randperm(P, generator=g)[:200]] = 9 + torch.rand(200, generator=g)
    x[4] = 10 + torch.floor(x[4] * 4) / 4
    x[4, 5::31] = float("nan")
    x[4, 7::41] = float("inf")
    x[4, pick] = torch.floor(torch.rand(S, generator=g) * 4)
    return x


@kernel_runs
@pytest.mark.parametrize("algo", SAMPLED)
@pytest.mark.parametrize("P,k,sample", [(8200, 256, None), (6000, 50, 256)])
def test_sample_variant_falls_back_on_adversarial_rows(P, k, sample, algo):
    x = _adversarial(P, k, sample)
    got, fell = sample_fallbacks(x.to(DEV), k, sample=sample, algo=algo)
    assert fell.all(), fell
    torch.testing.assert_close(got.cpu(), _rule(x, k), rtol=0, atol=0)
    # the same rows through the public entry point, and the search kernel on them
    for a in (algo, "search"):
        torch.testing.assert_close(topk_increasing(x.to(DEV), k, algo=a, sample=sample).cpu(), _rule(x, k),
                                   rtol=0, atol=0)


@kernel_runs
@pytest.mark.parametrize("segment", [16, 64, 512, 16384])
def test_split_variant_gathers_its_segments_in_order(segment):
    """The split variant over segments of every size, down to 16 scores (many segments, most of them empty of
    candidates: the gather must skip them) and up to the whole row (one segment): the rule's output, no
    fallback on Quest-like rows."""
    P, k = 3000, 64
    x = _quest_rows(11, 4, P)
    x[1, : P // 2] = 0.0  # the first half of a row holds no candidate: its segments are empty
    got, fell = sample_fallbacks(x.to(DEV), k, algo="split", segment=segment)
    assert not fell.any()
    torch.testing.assert_close(got.cpu(), _rule(x, k), rtol=0, atol=0)


@kernel_runs
@pytest.mark.parametrize("algo", SAMPLED)
def test_sample_variant_mixes_paths_across_rows(algo):
    """Rows of one call take different paths (fast, fallback, fast): each row's output its own."""
    P, k = 8200, 256
    x = torch.cat([_quest_rows(3, 1, P), _adversarial(P, k, None)[1:2], _quest_rows(4, 1, P)])
    got, fell = sample_fallbacks(x.to(DEV), k, algo=algo)
    assert fell.tolist() == [False, True, False]
    torch.testing.assert_close(got.cpu(), _rule(x, k), rtol=0, atol=0)


def test_sample_plan_brackets_and_fits():
    """The plan's numbers: the whole row as sample when it is short (rank window k exactly, buffer the row); else a
    rank window above the expected rank k S / P and a buffer of at least k."""
    assert sample_plan(1000, 37) == (1024, 37, 37, 1024)
    assert sample_plan(37, 5) == (64, 5, 5, 64)
    for P, k, s in [(8200, 256, None), (2056, 128, None), (100000, 1, 256), (8200, 8200, 512), (5000, 4000, 64)]:
        S, ra, rb, cap = sample_plan(P, k, s)
        assert k * S / P < ra <= rb and cap >= k and cap & (cap - 1) == 0 and cap <= 2 * P


_COMPILE = """
import sys
from triton import compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvsqueeze.kernels import topk as T

if sys.argv[1] == "search":
    fn, sig = T._topk_increasing, {"X": "*fp32", "OUT": "*i64", "P": "i32", "K": "i32", "s_x": "i32", "s_o": "i32"}
    consts = {"TILE": 1024, "W": 8}
elif sys.argv[1] == "split-compact":
    fn = T._topk_split_compact
    sig = {"X": "*bf16", "SV": "*fp32", "SI": "*i32", "CNT": "*i32", "P": "i32", "RA": "i32", "RB": "i32",
           "SEG": "i32", "s_x": "i32", "s_c": "i32", "s_n": "i32"}
    consts = {"TILE": 512, "S": 2048, "W": 8}
elif sys.argv[1] == "split-take":
    fn = T._topk_split_take
    sig = {"X": "*bf16", "OUT": "*i64", "SV": "*fp32", "SI": "*i32", "CNT": "*i32", "BV": "*fp32", "BI": "*i32",
           "FELL": "*i32", "P": "i32", "K": "i32", "NS": "i32", "SEG": "i32", "s_x": "i32", "s_o": "i32",
           "s_c": "i32", "s_n": "i32", "s_b": "i32"}
    consts = {"CAP": 1024, "TILE": 1024, "CT": 1024, "GT": 256, "NSP": 32, "W": 8}
else:
    fn = T._topk_sample
    sig = {"X": "*bf16", "OUT": "*i64", "SV": "*fp32", "SI": "*i32", "FELL": "*i32", "P": "i32", "K": "i32",
           "RA": "i32", "RB": "i32", "s_x": "i32", "s_o": "i32", "s_c": "i32"}
    consts = {"CAP": 2048, "TILE": 1024, "S": 1024, "CT": 1024, "W": 8}
sig.update({name: "constexpr" for name in consts})
k = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
            options={"num_warps": 8})
print("cubin", len(k.asm["cubin"]), "bar.sync", k.asm["ptx"].count("bar.sync"))
"""


@pytest.mark.skipif(triton is None, reason="needs triton (not in the CPU venv)")
@pytest.mark.parametrize("algo", ["search", "sample", "split-compact", "split-take"])
def test_kernels_compile_for_sm90(algo):
    """The kernels through Triton's whole compiler for an H100/H200 (sm_90: TTIR to cubin, no GPU needed; in a
    subprocess without TRITON_INTERPRET): catches what the interpreter lets through (a loop-carried value changing
    type, an unsupported construct). The sample kernel's buffer (and the split variant's gathered one) is read back
after a barrier (bar.sync)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE, algo], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0 and ("ImportError" in r.stderr or "ModuleNotFoundError" in r.stderr):
        pytest.skip(f"this triton cannot compile for sm_90 here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    cubin, size, _, bars = r.stdout.split()
    assert int(size) > 0 and (algo in ("search", "split-compact") or int(bars) > 0)
