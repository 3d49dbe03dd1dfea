"""Copy the rows of several results stores into one, keeping only the samples every source has complete.

    python bench/combine_stores.py [--union] OUT.sqlite IN1.sqlite IN2.sqlite [...]

A sample (task, sample_id, seed) is complete in a source when it has a row for every configuration (method,
params_json, compression_ratio) that source holds, on any task (so a run still going counts only its finished samples).
Only samples complete in every source are copied, so that
tools measured on different numbers of samples (e.g. kvsqueeze's sweep and kvpress's slower per-press loop, still
running) are compared on the same samples. OUT is written fresh (an existing file is refused). Prints, per task,
the samples kept and the configurations per source. A source written before issue 10 (column `ratio`) is opened
through `ResultStore` first, which renames it `compression_ratio` in place (as every kvsqueeze command does).
`--union` copies every row of every source instead (each configuration keeps its own sample count, which
`kvsqueeze frontier` prints as n).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def complete_samples(con: sqlite3.Connection) -> dict[str, set[tuple]]:
    """task -> {(sample_id, seed)} with a row for every configuration this store holds (on any task)."""
    cfg = "method || '|' || params_json || '|' || compression_ratio"
    n_cfg = con.execute(f"SELECT COUNT(DISTINCT {cfg}) FROM results").fetchone()[0]
    out: dict[str, set[tuple]] = {}
    for task, sid, seed, n in con.execute(f"SELECT task, sample_id, seed, COUNT(DISTINCT {cfg}) FROM results "
                                          "GROUP BY task, sample_id, seed"):
        out.setdefault(task, set())
        if n == n_cfg:
            out[task].add((sid, seed))
    return out


def main(argv: list[str]) -> int:
    union = "--union" in argv
    argv = [a for a in argv if a != "--union"]
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, ins = Path(argv[0]), [Path(p) for p in argv[1:]]
    if out.exists():
        print(f"error: {out} exists (the combined store is written fresh)", file=sys.stderr)
        return 2
    for p in ins:
        if not p.exists():
            print(f"error: {p} not found", file=sys.stderr)
            return 2
    from kvsqueeze.evaluation.store import ResultStore

    ResultStore(out).close()  # the schema
    for p in ins:  # bring older files to the current schema (the `ratio` column -> compression_ratio, in place)
        ResultStore(p, create=False).close()
    cons = [sqlite3.connect(p) for p in ins]
    if union:  # every sample any source has
        per = [{t: {(sid, seed) for sid, seed in c.execute("SELECT DISTINCT sample_id, seed FROM results WHERE "
                                                            "task = ?", (t,))}
                for (t,) in c.execute("SELECT DISTINCT task FROM results")} for c in cons]
        tasks = set.union(*[set(p) for p in per])
        keep = {t: set.union(*[p.get(t, set()) for p in per]) for t in sorted(tasks)}
    else:
        per = [complete_samples(c) for c in cons]
        tasks = set.intersection(*[set(p) for p in per])
        keep = {t: set.intersection(*[p[t] for p in per]) for t in sorted(tasks)}
    dst = sqlite3.connect(out)
    cols = [r[1] for r in dst.execute("PRAGMA table_info(results)") if r[1] != "id"]
    for p, con in zip(ins, cons):
        src_cols = {r[1] for r in con.execute("PRAGMA table_info(results)")}
        use = [f'"{c}"' for c in cols if c in src_cols]
        n = 0
        for t, samples in keep.items():
            for sid, seed in sorted(samples):
                rows = con.execute(f"SELECT {', '.join(use)} FROM results WHERE task = ? AND sample_id = ? "
                                   "AND seed = ?", (t, sid, seed)).fetchall()
                dst.executemany(f"INSERT OR IGNORE INTO results ({', '.join(use)}) VALUES "
                                f"({', '.join('?' * len(use))})", rows)
                n += len(rows)
        dst.commit()
        n_cfg = con.execute("SELECT COUNT(DISTINCT method || '|' || params_json || '|' || compression_ratio) "
                            "FROM results").fetchone()[0]
        print(f"{p}: {n} rows copied ({n_cfg} configurations)")
    for t, s in keep.items():
        print(f"{t}: {len(s)} samples" + ("" if union else " complete in every source"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
