"""Issue 14, head-wise / selection family: KVCrush, WindowKV, PrefixKV. Each rule against values computed by hand
on tiny tensors, the memory really freed on a tiny model, and the sweep's shared prefill building the cache a real
prefill builds."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

import kvsqueeze as kq
from kvsqueeze.methods import KVCrush, Method, PrefixKV, ScoreInputs, WindowKV
from kvsqueeze.methods.kvcrush import anchor_vector, head_bits, representatives
from kvsqueeze.methods.prefixkv import cumulative_profiles, forget_counts, layer_shares
from kvsqueeze.methods.windowkv import group_budget, window_scores
from kvsqueeze.quant import kivi
from kvsqueeze.runtime.generate import prefill, record_prefill

from conftest import kv, own_cache, prefixkv_profiles, tiny_llama


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module runs with one torch thread (conftest's `one_thread`)."""


def _inputs(n: int, hq: int, hk: int, n_keep: int, layer: int = 0, attn: torch.Tensor | None = None,
            q: int = 2) -> ScoreInputs:
    """ScoreInputs for one row of n slots at positions 0..n-1; `attn` (1, hq, n) is what `attention_sum(last=q)`
    returns (put in the memo: the window rules read the attention through it)."""
    gen = torch.Generator().manual_seed(layer)
    memo = {} if attn is None else {("attention_sum", layer, q): attn}
    return ScoreInputs(layer_idx=layer, n_layers=4, queries=torch.zeros(1, hq, q, 8),
                       keys=torch.randn(1, hk, n, 8, generator=gen), values=torch.zeros(1, hk, n, 8),
                       positions=torch.arange(n).expand(1, hk, n), valid=None, n_pad=None, seen=n, state={},
                       scaling=1.0, softcap=None, n_keep=n_keep, memo=memo)


def _top(scores: torch.Tensor, k: int) -> list[set[int]]:
    """Per kv head of row 0: the k slots `CompressedLayer.evict` keeps for these scores."""
    return [set(scores[0, h].topk(k).indices.tolist()) for h in range(scores.shape[1])]


def _ids(n, seed=0):
    return torch.randint(1, 101, (1, n), generator=torch.Generator().manual_seed(seed))


def _positions(cache) -> list[torch.Tensor]:
    return [layer.positions.clone() for layer in cache.layers]


def _assert_sweep_equals_prefill(model, make, ids, layer_factory=None):
    """The sweep's copy of one uncompressed prefill (`PrefillRecord.compress`) holds what a real prefill holds."""
    real = kq.CompressedCache(model, make(), layer_factory=layer_factory)
    prefill(model, real, ids)
    copy_ = record_prefill(model, ids).compress(model, make(), layer_factory)
    for i, (a, b) in enumerate(zip(real.layers, copy_.layers)):
        assert torch.equal(a.positions, b.positions), f"layer {i}"
    assert real.stats().kv_bytes == copy_.stats().kv_bytes
    return real


# --- KVCrush ------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Fixed(Method):
    """An importance method with fixed scores (b, hk, n)."""

    scores: torch.Tensor

    name = "fixed"

    def score(self, x):
        return self.scores.clone()


# three kv heads, 12 tokens: head 0 ranks 0..11, head 1 the even tokens first, head 2 ranks 11..0
_S = torch.tensor([[list(range(12, 0, -1)),
                    [20, 1, 19, 2, 18, 3, 17, 4, 16, 5, 15, 6],
                    list(range(1, 13))]], dtype=torch.float)


def test_kvcrush_head_bits_anchor_and_distance_by_hand():
    bits = head_bits(_S)
    assert bits[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 5]  # each head's top half
    assert bits[0, 1].nonzero().flatten().tolist() == [0, 2, 4, 6, 8, 10]
    assert bits[0, 2].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]
    anchor = anchor_vector("alternate", bits)
    assert anchor.tolist() == [[False, True, False]]
    distance = (bits != anchor[..., None]).sum(1)[0].tolist()
    # token vectors (1,1,0) / (1,0,0) / (0,1,1) / (0,0,1) against (0,1,0)
    assert distance == [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2]
    assert anchor_vector("mean", bits).tolist() == [[False, False, False]]  # each head sets exactly half: not > 0.5
    assert anchor_vector("ones", bits).all() and not anchor_vector("zeros", bits).any()
    with pytest.raises(kq.KVSqueezeError, match="unknown KVCrush anchor"):
        anchor_vector("median", bits)


def test_kvcrush_representatives_are_evenly_spaced_along_the_distance_order():
    distance = torch.tensor([[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2]])
    eligible = torch.zeros(1, 1, 12, dtype=torch.bool)
    eligible[0, 0, 6:] = True  # tokens 6..11 sorted by (distance, slot): 6, 8, 10, 7, 9, 11
    picks = representatives(distance, eligible, torch.tensor([3]))  # ranks 0, floor(5/2)=2, 5
    assert picks[0, 0].nonzero().flatten().tolist() == [6, 10, 11]
    picks = representatives(distance, eligible, torch.tensor([10]))  # fewer eligible than asked: all of them
    assert picks[0, 0].nonzero().flatten().tolist() == [6, 7, 8, 9, 10, 11]


def test_kvcrush_keeps_the_importance_tokens_and_one_per_group_by_hand():
    # budget 9, share 0.34: 3 representatives, 6 importance tokens per head
    method = KVCrush(scorer=_Fixed(scores=_S), budget=9, crush_share=0.34)
    kept = _top(method.score(_inputs(12, hq=3, hk=3, n_keep=9)), 9)
    # head 0: importance 0..5, eligible 6..11 -> 6, 10, 11 (see the test above)
    assert kept[0] == {0, 1, 2, 3, 4, 5, 6, 10, 11}
    # head 1: importance 0,2,4,6,8,10; eligible 1,3,5,7,9,11 all at distance 2 -> ranks 0, 2, 5
    assert kept[1] == {0, 2, 4, 6, 8, 10, 1, 5, 11}
    # head 2: importance 6..11; eligible 0..5 sorted 0, 2, 4 (distance 1), 1, 3, 5 (distance 2) -> 0, 4, 5
    assert kept[2] == {6, 7, 8, 9, 10, 11, 0, 4, 5}


def test_kvcrush_frees_memory_and_the_sweep_builds_the_same_cache():
    model = tiny_llama(layers=2)
    ids = _ids(80)
    cache = _assert_sweep_equals_prefill(model, lambda: kq.get_method("kvcrush", compression_ratio=0.5), ids)
    stats = cache.stats()
    assert stats.tokens_stored == [40, 40]
    assert stats.kv_bytes * 2 == stats.full_kv_bytes
    _assert_sweep_equals_prefill(model, lambda: kq.get_method("kvcrush:snapkv", compression_ratio=0.75), ids)


def test_kvcrush_composes_with_kivi():
    model = tiny_llama(layers=2)
    ids = _ids(80)
    full = kq.CompressedCache(model, kq.get_method("kvcrush", compression_ratio=0.0), layer_factory=kivi(4))
    half = kq.CompressedCache(model, kq.get_method("kvcrush", compression_ratio=0.5), layer_factory=kivi(4))
    prefill(model, full, ids)
    prefill(model, half, ids)
    assert half.stats().tokens_stored == [40, 40]
    assert half.stats().kv_bytes < full.stats().kv_bytes


def test_kvcrush_rejects_bad_fields():
    with pytest.raises(kq.KVSqueezeError, match="crush_share"):
        KVCrush(crush_share=1.0)
    with pytest.raises(kq.KVSqueezeError, match="unknown KVCrush anchor"):
        KVCrush(anchor="median")


# --- WindowKV -----------------------------------------------------------------------------------------------------
# two query heads over 10 slots; the last 2 are the observation window; windows of 4: W0 = 0..3, W1 = 4..7
_A = torch.tensor([[[1, 2, 3, 4, 10, 0, 0, 0, 0, 0],
                    [4, 4, 4, 4, 0, 0, 0, 6, 0, 0]]], dtype=torch.float)
_A_W0 = torch.tensor([[[9, 9, 9, 9, 0, 0, 0, 0, 0, 0]] * 2], dtype=torch.float)


def test_window_scores_by_hand():
    pos = torch.arange(10).expand(1, 2, 10)
    review = pos < 8
    avg = window_scores(_A, pos, review, 4, "average", 2)
    assert torch.allclose(avg, torch.tensor([[26 / 8, 16 / 8]]))  # mean over heads and tokens
    mx = window_scores(_A, pos, review, 4, "max", 2)
    # W0: head 0 (4 + 3) / 2, head 1 (4 + 4) / 2 -> 3.75; W1: (10 + 0) / 2 and (6 + 0) / 2 -> 4.0
    assert torch.allclose(mx, torch.tensor([[3.75, 4.0]]))


@pytest.mark.parametrize("mode,n_keep,expected", [
    ("localization", 6, {4, 5, 6, 7, 8, 9}),  # max rule: W1, then the observation window
    ("aggregation", 6, {0, 1, 2, 3, 8, 9}),  # average rule: W0
    ("localization", 7, {4, 5, 6, 7, 0, 8, 9}),  # one more slot: the first token of the next window
])
def test_windowkv_keeps_whole_windows_by_the_task_rule(mode, n_keep, expected):
    method = WindowKV(mode=mode, window=2, review_window=4, top=2, shared_layers=1, beta=14)
    kept = _top(method.score(_inputs(10, hq=2, hk=1, n_keep=n_keep, attn=_A)), n_keep)
    assert kept == [expected]


def test_windowkv_layers_of_a_group_reuse_the_first_layers_windows():
    method = WindowKV(window=2, review_window=4, top=2, shared_layers=2, beta=14)
    first = _top(method.score(_inputs(10, 2, 1, 6, layer=0, attn=_A)), 6)
    same_group = _top(method.score(_inputs(10, 2, 1, 6, layer=1, attn=_A_W0)), 6)  # its own attention prefers W0
    next_group = _top(method.score(_inputs(10, 2, 1, 6, layer=2, attn=_A_W0)), 6)
    assert first == same_group == [{4, 5, 6, 7, 8, 9}]
    assert next_group == [{0, 1, 2, 3, 8, 9}]
    alone = WindowKV(window=2, review_window=4, top=2, shared_layers=2, beta=14)  # no first layer seen: its own
    assert _top(alone.score(_inputs(10, 2, 1, 6, layer=1, attn=_A_W0)), 6) == [{0, 1, 2, 3, 8, 9}]


def test_windowkv_group_budgets_by_hand():
    # C = 40 - 8 = 32, g = 2, beta = 4: k_min = 32 * 2 / 4 = 16, k_max = 48; + the observation window 8
    assert [group_budget(40, 8, i, 4, 2, 4.0) for i in range(4)] == [56, 56, 24, 24]
    # three layers in groups (0, 1), (2): the pyramid shifted so that the mean stays C: 32 + 32 / 3 and
    # 32 - 2 * 32 / 3, rounded, + 8
    assert [group_budget(40, 8, i, 3, 2, 4.0) for i in range(3)] == [51, 51, 19]
    assert [group_budget(40, 8, i, 4, 8, 14.0) for i in range(4)] == [40] * 4  # one group: uniform


def test_windowkv_on_a_model_shares_windows_in_groups_and_frees_memory():
    model = tiny_llama(layers=4)
    ids = _ids(120, seed=3)
    make = lambda: kq.get_method("windowkv", compression_ratio=0.5, window=8, shared_layers=2, beta=4)  # noqa: E731
    cache = _assert_sweep_equals_prefill(model, make, ids)
    pos = _positions(cache)
    assert torch.equal(pos[0], pos[1]) and torch.equal(pos[2], pos[3])
    budgets = [make().n_keep(120, i, 4) for i in range(4)]
    assert cache.stats().tokens_stored == budgets and budgets[0] > budgets[2]
    assert cache.stats().kv_bytes * 2 == pytest.approx(cache.stats().full_kv_bytes, rel=0.02)
    for p in pos:  # every kv head the same windows; the kept review tokens are whole windows but at most one
        assert all(torch.equal(p[0, 0], p[0, h]) for h in range(p.shape[1]))
        review = [t for t in p[0, 0].tolist() if t < 120 - 8]
        counts = torch.bincount(torch.tensor(review) // 8)
        assert int(((counts > 0) & (counts < 8)).sum()) <= 1
    _assert_sweep_equals_prefill(model, make, ids, layer_factory=kivi(4))


def test_windowkv_rejects_bad_fields():
    with pytest.raises(kq.KVSqueezeError, match="unknown WindowKV mode"):
        WindowKV(mode="summary")
    with pytest.raises(kq.KVSqueezeError, match="beta"):
        WindowKV(beta=0)
    assert [group_budget(40, 8, i, 4, 2, 1.0) for i in range(4)] == [40] * 4  # beta < shared_layers: uniform


# --- PrefixKV -----------------------------------------------------------------------------------------------------
# two layers of 4 tokens: cumulative importance 0.4, 0.7, 0.9, 1 (spread) and 0.7, 0.8, 0.9, 1 (concentrated)
_P = torch.tensor([[0.4, 0.7, 0.9, 1.0], [0.7, 0.8, 0.9, 1.0]], dtype=torch.float64)


def test_prefixkv_search_by_hand():
    # target 3 of the 8 tokens: p = 0.5 removes 2 + 3 = 5 (too many); p = 0.75 keeps the shortest prefixes
    # reaching 0.75: 3 tokens (0.9) and 2 tokens (0.8), so it removes 1 + 2 = 3
    assert forget_counts(_P, 0.375, protect=0, tol=1).tolist() == [1, 2]
    # the reference's tolerance (5 tokens) stops at p = 0.5 (5 removed), then rescales to the target 4:
    # [2, 3] * 4 / 5 = [1.6, 2.4], truncated
    assert forget_counts(_P, 0.5, protect=0).tolist() == [1, 2]
    # protected tokens are never removed: at p = 0.75, 1 - 1 and 2 - 1
    assert forget_counts(_P, 0.125, protect=1, tol=1).tolist() == [0, 1]


def test_prefixkv_cumulative_profiles_and_shares_by_hand():
    prof = cumulative_profiles(torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 7.0]]))
    assert torch.allclose(prof, _P)
    # two samples at compression_ratio 0.5 (target 4 of 8, the reference's tolerance): the first removes [1, 2]
    # (above), the second stops at p = 0.5 with 2 + 2 = 4; removed fractions (1/4 + 2/4) / 2 and (2/4 + 2/4) / 2
    two = torch.stack([_P, torch.tensor([[0.3, 0.5, 0.8, 1.0], [0.3, 0.6, 0.8, 1.0]], dtype=torch.float64)])
    assert forget_counts(two[1], 0.5, protect=0).tolist() == [2, 2]
    assert torch.allclose(layer_shares(two, 0.5, protect=0), torch.tensor([5 / 8, 1 / 2], dtype=torch.float64))


def test_prefixkv_layer_budgets_and_kept_tokens_follow_the_rule():
    model = tiny_llama("eager", layers=3)
    ids = _ids(100, seed=5)
    profiles = prefixkv_profiles(3, n=64)
    make = lambda: PrefixKV(compression_ratio=0.5, profiles=profiles)  # noqa: E731
    shares = layer_shares(profiles.double(), 0.5, protect=2)
    expected = [round(50 * float(shares[i]) / float(shares.mean())) for i in range(3)]
    assert [make().n_keep(100, i, 3) for i in range(3)] == expected
    assert expected[0] > expected[1] > expected[2]  # the profiles' layers are more and more concentrated
    cache = _assert_sweep_equals_prefill(model, make, ids)
    assert cache.stats().tokens_stored == expected
    # the tokens: the first and the last, then the most attended (summed over queries, averaged over heads)
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    for li, layer in enumerate(cache.layers):
        imp = att[li][0].float().sum(1).mean(0)
        imp[0] = imp[-1] = float("inf")
        want = sorted(imp.topk(expected[li]).indices.tolist())
        for h in range(layer.positions.shape[1]):
            assert layer.positions[0, h].tolist() == want, f"layer {li} head {h}"
    quantized = _assert_sweep_equals_prefill(model, make, ids, layer_factory=kivi(4))  # composes with KIVI
    assert quantized.stats().tokens_stored == expected and quantized.stats().kv_bytes < cache.stats().kv_bytes


def test_prefixkv_absolute_budget_keeps_the_mean_budget():
    method = PrefixKV(budget=16, profiles=prefixkv_profiles(3, n=64))
    budgets = [method.n_keep(1000, i, 3) for i in range(3)]
    assert abs(sum(budgets) - 48) <= 1 and budgets[0] > budgets[2]


class _CharTokenizer:
    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 101 for c in text]]))


def test_prefixkv_calibration_profiles_are_the_attention_cumulated(tmp_path):
    from kvsqueeze.runtime.calibration import calibrate_prefixkv, prefixkv_path

    model = tiny_llama("eager", layers=2)
    text = "the quick brown fox jumps over the lazy dog. " * 4
    profiles = calibrate_prefixkv(model, _CharTokenizer(), texts=[text], n_seq=3, seq_len=10_000, progress=False)
    ids = _CharTokenizer()(text).input_ids
    assert profiles.shape == (1, 2, ids.shape[1])  # the text is shorter than seq_len: one window
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    want = cumulative_profiles(torch.stack([a[0].float().sum(1).mean(0) for a in att]))[None]
    assert torch.allclose(profiles.double(), want, atol=1e-5)
    # the runtime calibrates once per model, keeps the profiles in the cache directory, and reuses them
    model.kvsqueeze_tokenizer = _CharTokenizer()
    with own_cache(tmp_path):
        first = PrefixKV(compression_ratio=0.5)
        kq.CompressedCache(model, first)
        assert prefixkv_path(model).exists()
        second = PrefixKV(compression_ratio=0.5)
        kq.CompressedCache(model, second)
        assert torch.equal(first.profiles, second.profiles)


def test_prefixkv_without_profiles_or_tokenizer_says_so(tmp_path):
    with own_cache(tmp_path), pytest.raises(kq.KVSqueezeError, match="calibrate prefixkv"):
        kq.CompressedCache(tiny_llama(layers=2), PrefixKV(compression_ratio=0.5))
    with pytest.raises(kq.KVSqueezeError, match="do not fit"):
        PrefixKV(compression_ratio=0.5, profiles=prefixkv_profiles(3)).n_keep(100, 0, 4)


# --- all three: registry -----------------------------------------------------------------------------------------
def test_listed_and_built_by_name():
    for name in ("kvcrush", "windowkv", "prefixkv"):
        assert name in kq.METHODS
    assert isinstance(kq.get_method("kvcrush:tova", compression_ratio=0.5).scorer, kq.methods.TOVA)


def test_sweep_parameters_hold_no_run_time_state():
    """The sweep's key (`method_params`) holds parameters only: WindowKV's group memo and PrefixKV's shares cache
    are not dataclass fields, so a used method keeps its key."""
    import json

    from kvsqueeze.evaluation.sweep import method_params

    w = WindowKV(window=2, review_window=4, top=2, shared_layers=2)
    before = json.dumps(method_params(w), sort_keys=True)
    w.score(_inputs(10, 2, 1, 6, attn=_A))
    assert json.dumps(method_params(w), sort_keys=True) == before and "_shared" not in before
    p = PrefixKV(compression_ratio=0.5, profiles=prefixkv_profiles(3))
    before = method_params(p)
    p.n_keep(100, 0, 3)
    assert method_params(p) == before and "_shares" not in before
