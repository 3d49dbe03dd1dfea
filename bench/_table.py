"""The pieces the GPU benchmarks share. The row loop (gpu_decode.py, gpu_offload.py): each row runs on its own (the
peak-memory counter reset first; a failure is recorded in the row and printed on the row's line, and the other rows
go on), its peak GPU memory is read after it, and the rows are written to a JSON file with the arguments."""

from __future__ import annotations

import json
import math
import statistics

import torch


def attempt(fn, row: dict, rows: list, label: str, device):
    """fn()'s result, the peak-memory counter reset first (CUDA); None when fn raised: then `row["error"]` is the
    exception's type and first line, `label error: ...` is printed and `row` is appended to `rows`."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        return fn()
    except Exception as e:  # one failing row must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print(f"{label} error: {row['error']}", flush=True)
        rows.append(row)
        return None


def peak_gb(device) -> float:
    """The most GPU memory allocated since the last reset (`attempt`), in GB (1e9 bytes); NaN off CUDA."""
    return torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")


def int_list(text: str, flag: str, minimum: int = 1, pow2: bool = False) -> list[int]:
    """A bench option's comma-separated integers, each >= `minimum` (and a power of two with `pow2`). Raises
    ValueError naming `flag` (the bench prints it as its one error line)."""
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from None
    bad = [v for v in vals if v < minimum or (pow2 and v & (v - 1))]
    if bad:
        kind = "powers of two" if pow2 else "integers"
        raise ValueError(f"{flag} takes {kind} >= {minimum}, got {bad[0]}")
    return vals


def name_list(text: str, flag: str, allowed) -> list[str]:
    """A bench option's comma-separated names, each one of `allowed`. Raises ValueError naming `flag` (the bench
    prints it as its one error line)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in allowed]
    if not names or bad:
        raise ValueError(f"{flag} takes some of {','.join(allowed)}, got {text!r}")
    return names


def _finite(x):
    """NaN and infinities as None (JSON has no such numbers: `peak_gb` off CUDA is NaN), through lists and dicts."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str | None, args, rows: list) -> None:
    """Write {"args": vars(args), "rows": rows} to `path` (nothing when path is None), NaN and infinities as null
    (standard JSON)."""
    if path:
        with open(path, "w") as f:
            json.dump(_finite({"args": vars(args), "rows": rows}), f, indent=1, allow_nan=False)


def graph_us(fn, reps: int) -> float:
    """Median us of one replay of a CUDA graph of `fn` (captured after warm-up launches on a side stream)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0)
    return statistics.median(times)
