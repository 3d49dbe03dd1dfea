"""bench/family_table.py (issue 14's table): a method's variants (default vs tuned parameters) labelled apart, the
default marked, and the base read at the method's bytes (interpolated in log bytes, never extrapolated)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from kvsqueeze.evaluation.sweep import make_pairs

spec = importlib.util.spec_from_file_location("family_table", Path(__file__).parents[1] / "bench" / "family_table.py")
ft = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ft)


def _rows(method_spec: str, r: float, scores: list[float], kv: float, quant=None) -> list[dict]:
    p = make_pairs([method_spec], [r], quants=[quant])[0]
    return [{"model": "m", "method": p.name, "params_json": p.params_json, "compression_ratio": p.compression_ratio,
             "task": "passkey", "sample_id": f"s{i}", "score": s, "kv_bytes": kv, "kv_bytes_16": kv,
             "n_context_tokens": 100, "quant": quant} for i, s in enumerate(scores)]


@pytest.fixture
def pts():
    rows = (_rows("full", 0.0, [1, 1], 4000) + _rows("h2o", 0.5, [0, 0], 2000) + _rows("h2o", 0.75, [0, 0], 1000)
            + _rows("kvmerger", 0.5, [0, 0], 2000) + _rows("kvmerger(threshold=0.5)", 0.5, [1, 0], 2000)
            + _rows("windowkv", 0.5, [1, 1], math.sqrt(2000 * 4000)) + _rows("windowkv", 0.75, [0, 1], 500))
    return ft.points(pd.DataFrame(rows))


def test_variants_are_labelled_and_the_default_marked(pts):
    assert set(pts[pts.method == "kvmerger"].variant) == {"kvmerger (threshold=0.75) [default]",
                                                          "kvmerger (threshold=0.5)"}
    assert set(pts[pts.method == "windowkv"].variant) == {"windowkv"}  # one variant: the name alone
    tuned = pts[pts.variant == "kvmerger (threshold=0.5)"].iloc[0]
    assert tuned.score == 0.5 and tuned.n == 2 and tuned.step == 0.5


def test_base_read_at_equal_bytes(pts):
    # halfway (in log bytes) between h2o@0.5 (0.0 at 2000 B) and full (1.0 at 4000 B)
    assert ft.base_at(pts, "h2o", "none", math.sqrt(2000 * 4000)) == pytest.approx(0.5)
    assert ft.base_at(pts, "h2o", "none", 500) is None  # below h2o's smallest point: not extrapolated
    assert ft.base_at(pts, "h2o", "none", 1000 * 0.99) == pytest.approx(0.0)  # within 2% of an end point
    lines = ft.table(pts, {"kvmerger": "h2o", "windowkv": "h2o"})
    line = next(x for x in lines if "windowkv @0.5" in x)
    assert line.split()[-2:] == ["0.500", "+0.500"]
    assert "out of range" in next(x for x in lines if "windowkv @0.75" in x)
    assert json.loads(pts.iloc[0].to_json())  # plain values
