"""bench/gpu_decode.py runs end to end in its --quick mode (tiny shapes on the CPU): every row kind it prints
gives a positive time, the KV bytes its cache holds, and the bandwidth bound's columns."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = "hf-dynamic,hf-static-compiled,kvsq-eager:knorm,kvsq-static:adakv,kvsq-static:streaming"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decode.py"), "--quick", "--rows", rows,
                        "--static-kernels", "sdpa", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())["rows"]
    assert [d["row"] for d in data] == ["hf-dynamic", "hf-static-compiled", "kvsq-eager:knorm",
                                        "kvsq-static:adakv/sdpa", "kvsq-static:streaming/sdpa"]
    for d in data:
        assert "error" not in d, d
        assert d["ms_per_token"] > 0 and d["kv_bytes"] > 0
        assert d["read_bytes"] == d["kv_bytes"]  # no selection: a step reads every byte it holds
        assert abs(d["limit_ms"] - (d["weight_bytes"] + d["kv_bytes"]) / 4.2e12 * 1e3) < 1e-9
    by = {d["row"]: d for d in data}
    # the compressed caches hold less than the full ones (streaming: a budget of length / 8 plus one slot)
    assert by["kvsq-static:streaming/sdpa"]["kv_bytes"] < by["hf-dynamic"]["kv_bytes"] / 4
    assert by["kvsq-eager:knorm"]["kv_bytes"] < by["hf-dynamic"]["kv_bytes"] / 4


def test_quick_mode_runs_the_quest_rows(tmp_path):
    """Quest and AttentionPredictor rows (issue 12: budget 4096 on the GPU; --quick: a quarter of the context) run
    eager and static, the static one with each torch kernel; the static cache holds the full context."""
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_decode.py"), "--quick", "--rows",
                        "kvsq-eager:full,kvsq-eager:quest,kvsq-static:quest,kvsq-static:ap", "--static-kernels",
                        "sdpa,matmul", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    data = {d["row"]: d for d in json.loads(out.read_text())["rows"]}
    assert list(data) == ["kvsq-eager:full", "kvsq-eager:quest", "kvsq-static:quest/sdpa", "kvsq-static:quest/matmul",
                          "kvsq-static:ap/sdpa", "kvsq-static:ap/matmul"]
    for d in data.values():
        assert "error" not in d, d
        assert d["ms_per_token"] > 0 and d["ms_mean"] > 0
    assert data["kvsq-static:quest/sdpa"]["kv_bytes"] >= data["kvsq-eager:full"]["kv_bytes"]
    assert data["kvsq-static:ap/sdpa"]["kv_bytes"] == data["kvsq-static:quest/sdpa"]["kv_bytes"]
    # the bound counts what a selecting step reads: layer 0 dense (half the KV of the 2-layer model), a quarter of
    # layer 1 (--quick's budget) and the selector's buffers, not the whole cache held
    for row in ("kvsq-static:quest/sdpa", "kvsq-static:ap/sdpa"):
        d = data[row]
        assert 0.5 * d["kv_bytes"] < d["read_bytes"] < d["kv_bytes"], row
        assert abs(d["limit_ms"] - (d["weight_bytes"] + d["read_bytes"]) / 4.2e12 * 1e3) < 1e-9
    assert data["kvsq-eager:quest"]["read_bytes"] == data["kvsq-eager:quest"]["kv_bytes"]


def test_topk_option_picks_the_page_choice(monkeypatch):
    """--topk (bench/gpu_decode.py and bench/gpu_offload.py): a kernel by name sets kernels/topk.ALGO, "torch"
    turns the kernel off, "kernel" keeps the default."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_decode

    from kvsqueeze.kernels import topk

    monkeypatch.setattr(topk, "ALGO", topk.ALGO)
    monkeypatch.setattr(topk, "KERNEL", True)
    default = topk.ALGO
    gpu_decode.set_topk("kernel")
    assert topk.KERNEL and topk.ALGO == default
    gpu_decode.set_topk("split")
    assert topk.KERNEL and topk.ALGO == "split"
    gpu_decode.set_topk("torch")
    assert not topk.KERNEL


def test_bench_json_is_standard_json(tmp_path, monkeypatch):
    """The benches' JSON (bench/_table.write_json): NaN (peak memory off CUDA) written as null, not NaN."""
    import argparse
    import math

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from _table import write_json

    out = tmp_path / "rows.json"

    write_json(str(out), argparse.Namespace(a=1), [{"peak_gb": math.nan, "x": [1.0, math.inf], "y": {"z": -math.inf}}])
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rows"] == [{"peak_gb": None, "x": [1.0, None], "y": {"z": None}}]
