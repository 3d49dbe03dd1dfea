"""Compare two results stores row by row (e.g. the same sweep run by two code versions).

    python bench/compare_stores.py BEFORE.sqlite AFTER.sqlite

Rows are matched on (model, method, params, compression_ratio, task, sample, seed, quant, select, select_budget); the
code version is ignored. For every matched row the result columns must be equal: score, prediction, kv_bytes,
kv_bytes_16, full_kv_bytes, n_context_tokens, and `meta_json.kept_digest` (which slots every layer kept). Prints the
counts, every differing row (up to --show), the rows only one side has, and exits 1 when a matched row differs.
`--rename old=new` maps a params key renamed between the versions (repeatable). A store written before issue 10
(column `ratio`, nested params key "ratio") is read as the current schema (`compression_ratio`) without being
modified, so an old store compares with a new one as is.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys

KEY = ("model", "method", "params_json", "compression_ratio", "task", "sample_id", "seed", "quant", "select",
       "select_budget")
OLD_NAMES = {"ratio": "compression_ratio"}  # column / params key names before issue 10
COLUMNS = ("score", "prediction", "kv_bytes", "kv_bytes_16", "full_kv_bytes", "n_context_tokens")


def _renamed(p, rename: dict[str, str]):
    """`p` with the keys in `rename` renamed, at every depth (a wrapper's scorer / inner method's fields too)."""
    if isinstance(p, dict):
        return {rename.get(k, k): _renamed(v, rename) for k, v in p.items()}
    return p


def rows(path: str, rename: dict[str, str]) -> dict[tuple, dict]:
    con = sqlite3.connect(path)
    con.row_factory = sqlite3.Row
    out = {}
    for r in con.execute("SELECT * FROM results"):
        r = {OLD_NAMES.get(k, k): v for k, v in dict(r).items()}
        params = _renamed(json.loads(r["params_json"] or "{}"), {**OLD_NAMES, **rename})
        r["params_json"] = json.dumps(params, sort_keys=True)
        meta = json.loads(r.get("meta_json") or "{}")
        r["kept_digest"] = meta.get("kept_digest")
        out[tuple(r.get(k) for k in KEY)] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rename", action="append", default=[], help="old=new params key renamed between versions")
    ap.add_argument("--show", type=int, default=10)
    a = ap.parse_args()
    rename = dict(x.split("=", 1) for x in a.rename)
    b, c = rows(a.before, rename), rows(a.after, rename)
    common = sorted(set(b) & set(c), key=str)
    differ = []
    for k in common:
        cols = [col for col in COLUMNS + ("kept_digest",) if b[k].get(col) != c[k].get(col)]
        if cols:
            differ.append((k, cols))
    versions = (sorted({r["code_version"] for r in b.values()}), sorted({r["code_version"] for r in c.values()}))
    print(f"before: {len(b)} rows {versions[0]}; after: {len(c)} rows {versions[1]}")
    print(f"matched: {len(common)}; equal in {', '.join(COLUMNS)}, kept_digest: {len(common) - len(differ)}; "
          f"differ: {len(differ)}; only before: {len(set(b) - set(c))}; only after: {len(set(c) - set(b))}")
    for k, cols in differ[: a.show]:
        print("  differ:", dict(zip(KEY, k)), {col: (b[k].get(col), c[k].get(col)) for col in cols})
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
