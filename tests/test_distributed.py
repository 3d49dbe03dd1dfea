"""Sweeps over several processes: `torchrun --nproc-per-node 2 -m kvsqueeze sweep ...` on the CPU (gloo), one
results store, no duplicates, resumable; plus --device / --dtype parsing and the sharding rule."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvsqueeze
from kvsqueeze.devices import resolve_device, resolve_dtype
from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.evaluation.distributed import DistInfo, init_distributed, world_from_env

from conftest import assert_one_error_line, own_cache

SRC = str(Path(kvsqueeze.__file__).resolve().parents[1])


def _rows(db):
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT method, params_json, compression_ratio, task, sample_id, seed, code_version, meta_json "
                           "FROM results ORDER BY id").fetchall()
    finally:
        con.close()


def _torchrun(args, tmp_path, timeout=300):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "KVSQUEEZE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "kvsqueeze", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_torchrun_sweep_one_store_no_duplicates_resumable(tiny_dir, tmp_path):
    db = tmp_path / "d.sqlite"
    args = ["sweep", "--model", str(tiny_dir), "--methods", "full,snapkv,knorm", "--compression-ratios", "0.5",
            "--tasks", "passkey", "--samples", "3", "--length", "256", "--results", str(db), "--code-version", "t",
            "--quiet", "--device", "cpu"]
    out = _torchrun(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # rank 0 alone prints the summary, with the rows of both ranks counted
    assert out.stdout.count("rows added") == 1, out.stdout
    assert "9 rows added, 0 already stored; 3 shared prefills" in out.stdout
    rows = _rows(db)
    keys = [r[:7] for r in rows]
    assert len(rows) == 9 and len(set(keys)) == 9  # 3 samples x (full, snapkv, knorm), each once
    assert {r[0] for r in rows} == {"full", "snapkv", "knorm"}
    samples = sorted({r[4] for r in rows})
    assert len(samples) == 3
    rank_of = {}
    for r in rows:
        meta = json.loads(r[7])
        assert meta["dist_world"] == 2
        assert rank_of.setdefault(r[4], meta["dist_rank"]) == meta["dist_rank"]  # a sample stays on one rank
    # round-robin over the samples in task order: ranks 0, 1, 0 (sample ids are "L256-<i>#hash")
    by_index = {s.split("#")[0]: rank_of[s] for s in samples}
    assert by_index == {"L256-0": 0, "L256-1": 1, "L256-2": 0}

    # resume: drop rank 0's two samples; the rerun deals the two pending samples out after the resume filter
    # (one per rank), adds exactly those rows, and leaves the stored one alone
    gone = [s for s in samples if rank_of[s] == 0]
    con = sqlite3.connect(db)
    con.execute(f"DELETE FROM results WHERE sample_id IN ({','.join('?' * len(gone))})", gone)
    con.commit()
    con.close()
    out = _torchrun(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "6 rows added, 3 already stored; 2 shared prefills" in out.stdout
    rows2 = _rows(db)
    assert len(rows2) == 9 and len({r[:7] for r in rows2}) == 9 and {r[:7] for r in rows2} == set(keys)
    ranks2 = {r[4]: json.loads(r[7])["dist_rank"] for r in rows2 if r[4] in gone}
    assert sorted(ranks2.values()) == [0, 1]  # balanced after the filter, not both on rank 0

    # and a plain (single-process) rerun of the same command finds everything stored
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    with own_cache(tmp_path / "cache"):
        r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "0 rows added, 9 already stored" in r.output
    assert len(_rows(db)) == 9


def test_device_and_dtype_options_on_generate_eval_sweep():
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    for cmd in ("generate", "eval", "sweep"):  # (`python -m kvsqueeze` itself runs in the torchrun test above)
        r = CliRunner().invoke(main, [cmd, "--help"])
        assert r.exit_code == 0 and "--device" in r.output and "--dtype" in r.output, r.output
        assert "--attn-implementation" in r.output, r.output


def test_sharding_and_environment(monkeypatch):
    d = DistInfo(rank=1, world=3)
    assert d.shard(list(range(8))) == [1, 4, 7]
    assert DistInfo().shard([1, 2]) == [1, 2] and not DistInfo().active
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1, 0)
    assert init_distributed(torch.device("cpu")) == DistInfo()  # no torchrun: no process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(KVSqueezeError, match="do not fit"):
        world_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(KVSqueezeError, match="must be integers"):
        world_from_env()
    if torch.cuda.device_count() >= 1:
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(KVSqueezeError, match="use --device cuda"):
            init_distributed(torch.device("cuda", 0))


def test_ranks_share_gpus_round_robin_over_gloo():
    from kvsqueeze.evaluation.distributed import rank_gpu

    assert [rank_gpu(r, 2, 2) for r in range(2)] == [(0, "nccl"), (1, "nccl")]  # one GPU per rank
    assert [rank_gpu(r, 2, 5) for r in range(5)] == [(0, "gloo"), (1, "gloo"), (0, "gloo"), (1, "gloo"), (0, "gloo")]
    assert rank_gpu(3, 1, 8) == (0, "gloo")
    with pytest.raises(KVSqueezeError, match="no CUDA GPU"):
        rank_gpu(0, 0, 2)


def test_device_and_dtype_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    for bad in ("gpu", "cuda:x", "cuda:-1"):
        with pytest.raises(KVSqueezeError, match="--device must be"):
            resolve_device(bad)
    with pytest.raises(KVSqueezeError, match="--dtype must be one of"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(KVSqueezeError, match="only 1 CUDA|only 0 CUDA|no CUDA GPU|only \\d+ CUDA"):
        resolve_device(f"cuda:{max(torch.cuda.device_count(), 0) + 7}")


@pytest.mark.parametrize("args, message", [
    (["sweep", "--methods", "full", "--dtype", "float8"], "--dtype must be one of"),
    (["eval", "--method", "full", "--device", "tpu"], "--device must be"),
    (["eval", "--method", "full", "--attn-implementation", "flash_attention_2"], "--attn-implementation must be"),
    (["sweep", "--methods", "full", "--attn-implementation", "flex"], "--attn-implementation must be"),
])
def test_bad_device_or_dtype_is_one_error_line(args, message, tmp_path):
    assert_one_error_line(args + ["--results", str(tmp_path / "x.sqlite")], message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused(tmp_path):
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    ctx = tmp_path / "c.txt"
    ctx.write_text("some context")
    r = CliRunner().invoke(main, ["generate", "--context-file", str(ctx), "--question", "q?", "--device", "cuda"])
    assert r.exit_code == 2 and r.output.strip().startswith("error: --device cuda: torch sees no CUDA GPU"), r.output


def _write_rows(path, order, out):
    from kvsqueeze.evaluation.store import ResultStore

    with ResultStore(path) as st:
        added = 0
        for i in order:
            added += st.add({"model": "m", "method": "full", "params_json": "{}", "compression_ratio": 0.0, "task": "t",
                             "sample_id": f"s{i}", "seed": 0, "code_version": "v", "score": float(i),
                             "meta_json": {"writer": os.getpid()}})
    out.put(added)


def test_concurrent_writers_share_one_store_without_duplicates(tmp_path):
    """Two processes insert the same 150 keys (in opposite orders) into one file at once: every key once, no
    'database is locked' (busy timeout), and the inserts reported as new add up to exactly 150."""
    import multiprocessing as mp

    from kvsqueeze.evaluation.store import ResultStore

    db = tmp_path / "w.sqlite"
    ResultStore(db).close()  # created first, as rank 0 does
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_write_rows, args=(db, order, q)) for order in (range(150), range(149, -1, -1))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    added = [q.get(timeout=5) for _ in procs]
    assert sum(added) == 150  # each key inserted by exactly one of them
    with ResultStore(db) as st:
        df = st.frame()
    assert len(df) == 150 and df.sample_id.nunique() == 150


def test_generate_attn_implementation_and_compile(tiny_dir, tmp_path):
    """generate --attn-implementation eager loads the model with eager attention; --compile decodes over the
    static cache (compiled) and answers what the eager loop answers; a bad name is one error line."""
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    ctx = tmp_path / "c.txt"
    ctx.write_text("The passkey is 4821. " * 20)
    base = ["generate", "--model", str(tiny_dir), "--context-file", str(ctx), "--question", "What is the passkey?",
            "--method", "knorm", "--ratio", "0.5", "--max-new-tokens", "6", "--attn-implementation", "eager"]
    with own_cache(tmp_path / "cache"):
        eager = CliRunner().invoke(main, base)
        assert eager.exit_code == 0, eager.output
        compiled = CliRunner().invoke(main, base + ["--compile"])
        assert compiled.exit_code == 0, compiled.output
    assert compiled.output.splitlines()[0] == eager.output.splitlines()[0]
    assert_one_error_line(base[:-1] + ["flash"], "--attn-implementation must be")
    assert_one_error_line(base + ["--compile", "--quant", "gear-4"], "--compile decodes full-precision or KIVI")
    assert_one_error_line(base + ["--compile", "--offload", "disk", "--select", "quest"], "--compile offloads to cpu")
