"""bench/gpu_offload.py runs end to end in its --quick mode (tiny shapes on the CPU): the offloaded rows decode the
tokens of on-device selection, move bytes, and report a hit rate and the bytes held on each side."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_mode_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_offload.py"), "--quick", "--steps", "4",
                        "--rows", "hf-offloaded,kvsq-gpu:quest,kvsq-offload:quest", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {d["row"]: d for d in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["hf-offloaded", "kvsq-gpu:quest", "kvsq-offload:quest"]
    assert rows["hf-offloaded"]["skipped"] == "needs CUDA"
    gpu, off = rows["kvsq-gpu:quest"], rows["kvsq-offload:quest"]
    assert "error" not in gpu and "error" not in off, (gpu, off)
    assert off["same_tokens"] is True
    assert off["ms_per_token"] > 0 and off["moved_per_token"] > 0 and 0 <= off["hit_rate"] <= 1
    assert gpu["host_kv"] == 0 and gpu["moved_per_token"] == 0
    assert off["host_kv"] > 0 and off["gpu_kv"] < gpu["gpu_kv"]  # the sparse layers' KV left the device


def test_quick_mode_static_rows(tmp_path):
    """The static-step rows: offloaded (page frames) and mapped (in place) decode the on-device tokens, the frames
    move fewer bytes than the in-place read, with a hit rate."""
    out = tmp_path / "rows.json"
    names = ["kvsq-static:quest", "kvsq-static-mapped:quest", "kvsq-static-offload:quest", "kvsq-static:ap",
             "kvsq-static-offload:ap"]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_offload.py"), "--quick", "--steps", "4",
                        "--rows", ",".join(names), "--frames", "1.5", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {d["row"]: d for d in json.loads(out.read_text())["rows"]}
    assert list(rows) == names and not any("error" in d for d in rows.values()), rows
    mapped, framed, ap = rows["kvsq-static-mapped:quest"], rows["kvsq-static-offload:quest"], \
        rows["kvsq-static-offload:ap"]
    assert mapped["same_tokens"] is True and framed["same_tokens"] is True and ap["same_tokens"] is True
    assert mapped["hit_rate"] is None and 0 < framed["hit_rate"] < 1 and 0 < ap["hit_rate"] < 1
    assert 0 < framed["moved_per_token"] < mapped["moved_per_token"]
    assert rows["kvsq-static:quest"]["moved_per_token"] == 0 and framed["host_kv"] > 0
    assert framed["gpu_kv"] > mapped["gpu_kv"]  # the frames (1.5x the pages per step) are device KV


def test_bad_frames_ratio_is_one_error_line():
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_offload.py"), "--quick", "--frames", "0.5"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip() == "error: --frames must be >= 1, got 0.5"
