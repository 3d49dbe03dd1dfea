"""A resumable results store: one SQLite file, one row per (model, method, params, compression_ratio, task, sample,
seed, code version).

Each row is inserted in its own committed transaction (WAL mode) right after it is computed, so a sweep killed at
any point (even with kill -9) keeps every finished row; running it again skips the keys already present, and the
UNIQUE key makes a duplicate impossible even when two sweeps write the same file. Tables come out through pandas.

`compression_ratio` is the method's nominal `compression_ratio` (the fraction of the cache removed, kvpress's name);
it is -1 for a method given an absolute `budget` (its params_json then says the budget) and 0 for `full`.

Files written before issue 10 named that column `ratio` (and the nested methods' key in params_json "ratio"):
opening one renames both in place, once (`ResultStore._migrate`), so old rows keep their keys.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

from ..errors import KVSqueezeError

KEY = ("model", "method", "params_json", "compression_ratio", "task", "sample_id", "seed", "code_version")
COLUMNS = {
    "model": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",
    "params_json": "TEXT NOT NULL",
    "compression_ratio": "REAL NOT NULL",
    "task": "TEXT NOT NULL",
    "sample_id": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "code_version": "TEXT NOT NULL",
    "metric": "TEXT",  # the primary metric: string_match_all, string_match_part or perplexity
    "score": "REAL",  # that metric (0-1 for string matches; perplexity is lower-is-better)
    "metrics_json": "TEXT",  # every metric computed
    "prediction": "TEXT",
    "answers_json": "TEXT",
    "kv_bytes": "INTEGER",  # right after compressing the context (before the question)
    "total_bytes": "INTEGER",
    "full_kv_bytes": "INTEGER",
    "n_context_tokens": "INTEGER",
    "n_question_tokens": "INTEGER",
    "length": "INTEGER",  # requested length (tokens) of the sample
    "depth": "REAL",  # needle depth when the task has one
    "meta_json": "TEXT",
    "protocol": "TEXT",  # shared-prefill | re-prefill (generate_answer) | ...
    "seconds": "REAL",  # compression + answer (shared prefill) or the whole generate_answer call
    "created_at": "REAL",
    # added with quantized storage and decode-time selection in sweeps (older files get them by ALTER TABLE;
    # their rows read NULL = none). The key stays the KEY above: a configuration's quant / select / budget are
    # also folded into params_json (only when set, so rows without them keep their old keys).
    "quant": "TEXT",  # --quant scheme (kivi-4, ...), NULL: full-precision storage
    "select": "TEXT",  # decode-time selector (quest, attention_predictor, leoam), NULL: dense attention
    "select_budget": "INTEGER",  # tokens each decoding step attends to with the selector
    "kv_bytes_16": "INTEGER",  # kv bytes as a 16-bit deployment holds them (see evaluation/sizes.py)
    "full_kv_bytes_16": "INTEGER",  # the uncompressed 16-bit cache's bytes for the same tokens
}
ADDED = ("quant", "select", "select_budget", "kv_bytes_16", "full_kv_bytes_16")
OLD_RATIO = "ratio"  # the name of the compression_ratio column (and params key) in files written before issue 10


def renamed_params_json(params_json: str) -> str:
    """`params_json` with every nested "ratio" key (a wrapper's scorer, MiKV's inner method: the old name of
    `compression_ratio`) renamed "compression_ratio", serialized as sweeps write it (`json.dumps(sort_keys=True)`);
    the string itself when it has no such key (or is not JSON)."""
    try:
        params = json.loads(params_json)
    except (TypeError, ValueError):
        return params_json
    found = False

    def rename(p):
        nonlocal found
        if isinstance(p, dict):
            found = found or OLD_RATIO in p
            return {("compression_ratio" if k == OLD_RATIO else k): rename(v) for k, v in p.items()}
        return p

    out = rename(params)
    return json.dumps(out, sort_keys=True) if found else params_json


def code_version() -> str:
    """The package version, plus the git commit of the source tree when it is a git checkout."""
    from ..version import __version__

    src = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


class ResultStore:
    """`ResultStore(path)`: open (or create) the SQLite file at `path`."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise KVSqueezeError(f"results file not found: {self.path}")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses no commit
            cols = ",\n  ".join(f'"{k}" {v}' for k, v in COLUMNS.items())  # quoted: "select" is a keyword
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS results (\n  id INTEGER PRIMARY KEY,\n  {cols},\n"
                f"  UNIQUE ({', '.join(KEY)}))"
            )
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise KVSqueezeError(f"{self.path} is not a kvsqueeze results database ({e})") from None

    def _columns(self) -> set[str]:
        return {r[1] for r in self.conn.execute("PRAGMA table_info(results)")}

    def _migrate(self) -> None:
        """Bring a file written by an older version to the current schema: a `ratio` column (before issue 10) is
        renamed `compression_ratio` (see `_rename_ratio`); columns it lacks are added (existing rows read NULL
        there)."""
        have = self._columns()
        if OLD_RATIO in have and "compression_ratio" not in have:
            self._rename_ratio()
            have = self._columns()
        for name in COLUMNS:
            if name in have:
                continue
            try:
                self.conn.execute(f'ALTER TABLE results ADD COLUMN "{name}" {COLUMNS[name]}')
            except sqlite3.OperationalError as e:  # another process added it meanwhile
                if "duplicate column" not in str(e):
                    raise

    def _rename_ratio(self) -> None:
        """`ALTER TABLE results RENAME COLUMN ratio TO compression_ratio` (SQLite >= 3.25 keeps the UNIQUE key on
        the renamed column) and the nested "ratio" keys of params_json renamed (`renamed_params_json`), in one
        transaction: a second process opening the same file meanwhile finds it done. Raises `KVSqueezeError` when
        the SQLite library is older than 3.25."""
        if sqlite3.sqlite_version_info < (3, 25, 0):
            raise KVSqueezeError(f"{self.path} has the old column name `{OLD_RATIO}`; renaming it compression_ratio "
                                 f"needs SQLite >= 3.25 (this Python has {sqlite3.sqlite_version})")
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            have = self._columns()
            if OLD_RATIO in have and "compression_ratio" not in have:
                self.conn.execute(f'ALTER TABLE results RENAME COLUMN "{OLD_RATIO}" TO "compression_ratio"')
                for rid, pj in self.conn.execute("SELECT id, params_json FROM results").fetchall():
                    new = renamed_params_json(pj)
                    if new != pj:
                        self.conn.execute("UPDATE results SET params_json = ? WHERE id = ?", (new, rid))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def close(self):
        self.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def key_of(row: dict) -> tuple:
        return tuple(float(row[k]) if k == "compression_ratio" else row[k] for k in KEY)

    def done_keys(self, model: str | None = None, code_version: str | None = None) -> set[tuple]:
        """Keys already stored (optionally restricted to one model and code version)."""
        q, args = f"SELECT {', '.join(KEY)} FROM results", []
        where = []
        if model is not None:
            where.append("model = ?")
            args.append(model)
        if code_version is not None:
            where.append("code_version = ?")
            args.append(code_version)
        if where:
            q += " WHERE " + " AND ".join(where)
        return {self.key_of(dict(zip(KEY, r))) for r in self.conn.execute(q, args)}

    def add(self, row: dict) -> bool:
        """Insert one row in its own committed transaction; False when its key was already there."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns: {sorted(unknown)}")
        row = {**row, "created_at": row.get("created_at", time.time())}
        for k in ("metrics_json", "answers_json", "meta_json"):
            if k in row and not isinstance(row[k], str):
                row[k] = json.dumps(row[k], ensure_ascii=False, sort_keys=True)
        for k, v in row.items():  # numpy scalars (from pandas) would be stored as blobs and dodge the key
            if hasattr(v, "item") and not isinstance(v, (str, bytes)):
                row[k] = v.item()
        row["compression_ratio"], row["seed"] = float(row["compression_ratio"]), int(row["seed"])
        names = list(row)
        quoted = ", ".join(f'"{n}"' for n in names)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO results ({quoted}) VALUES ({', '.join('?' * len(names))})",
                [row[n] for n in names],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return cur.rowcount == 1

    def count(self) -> int:
        return self.conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    def frame(self):
        """Every row as a pandas DataFrame."""
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM results ORDER BY id", self.conn)


_NOT_VARIANT = {"name", "quant", "select", "select_budget", "offload", "protocol"}  # columns, or the same per row


def variant_labels(df) -> list[str]:
    """The `method` column of a results frame with, for a method stored with several parameter sets, the
    parameters that set its variants apart: ["kvmerger(threshold=0.5)", "kvmerger(threshold=0.75)", "h2o", ...]
    (one per row). Storage, selection and the protocol are not parameters here (they have columns); a nested
    method (a scorer) counts by its name, so its compression_ratio, which follows the row's, never splits a
    method."""
    def stripped(pj: str) -> str:
        p = json.loads(pj) if pj else {}
        return json.dumps({k: (v.get("name") if isinstance(v, dict) else v) for k, v in p.items()
                           if k not in _NOT_VARIANT}, sort_keys=True, default=str)

    keys = [stripped(p) for p in df.params_json] if "params_json" in df else [""] * len(df)
    by_method: dict[str, list[str]] = {}
    for m, k in zip(df.method, keys):
        by_method.setdefault(m, [])
        if k not in by_method[m]:
            by_method[m].append(k)
    labels = {}
    for m, variants in by_method.items():
        for v, diff in distinguishing_params(variants).items():
            labels[(m, v)] = m if diff is None else f"{m}(" + ",".join(f"{k}={x}" for k, x in diff) + ")"
    return [labels[(m, k)] for m, k in zip(df.method, keys)]


def distinguishing_params(variants: list[str]) -> dict[str, list[tuple[str, object]] | None]:
    """For one method's parameter sets (JSON objects as strings): each set's (key, value) pairs, sorted by key, that
    differ from at least one other set; None when the method has a single set (nothing to tell apart)."""
    if len(variants) == 1:
        return {variants[0]: None}
    out = {}
    for v in variants:
        mine, others = json.loads(v), [json.loads(o) for o in variants if o != v]
        out[v] = sorted((k, x) for k, x in mine.items() if any(o.get(k) != x for o in others))
    return out


def summary_table(df, value: str = "score"):
    """Mean `value` per (method, compression_ratio) row and task column: the table printed after a sweep. A method
    stored with several parameter sets (a tuned and a default configuration) gets one row per set, labelled by
    `variant_labels`; storage, selection and offloading, where they vary, are index columns ("-": none)."""
    if df.empty:
        return df
    df = df.assign(method=variant_labels(df))
    if "params_json" in df:  # offloading is a run parameter, not a column: a column here when some row offloaded
        off = [json.loads(p).get("offload") if p else None for p in df.params_json]
        if any(o not in (None, "none") for o in off):
            df = df.assign(offload=off)
    index = ["method", "compression_ratio"]
    extra = [c for c in ("quant", "select", "select_budget", "offload") if c in df and df[c].notna().any()]
    if extra:  # storage / selection sweeps: one row per configuration ("-": full precision, dense)
        df = df.assign(**{c: df[c].map(lambda v: "-" if v is None or v != v else
                                       (str(int(v)) if isinstance(v, float) else str(v))) for c in extra})
        index += extra
    t = df.pivot_table(index=index, columns="task", values=value, aggfunc="mean")
    order = sorted(t.index, key=lambda ix: (ix[0] != "full", ix[0], *ix[1:]))
    return t.loc[order]


def error_notes(df, value: str = "score") -> list[str]:
    """How much one sample moves a cell of `summary_table(df)`, per task column: the samples per cell (n) and,
    for string-match scores in [0, 1], the step 1/n; for perplexity the largest change that dropping one sample
    makes in any cell of that column."""
    if df.empty:
        return []
    from .frontier import one_sample_step

    parts = []
    for task, d in df.groupby("task", sort=True):
        cells = d.groupby(["method", "params_json", "compression_ratio"])
        ns = cells.sample_id.nunique()
        metric = d.metric.iloc[0]
        n_txt = str(ns.min()) if ns.min() == ns.max() else f"{ns.min()}-{ns.max()}"
        steps = [one_sample_step(g[value], metric) for _, g in cells]
        steps = [x for x in steps if x == x]
        if not steps:
            parts.append(f"{task} n={n_txt}")
        elif metric == "perplexity":
            parts.append(f"{task} n={n_txt} (dropping one sample moves a cell by up to {max(steps):.3g})")
        else:
            parts.append(f"{task} n={n_txt} (one sample moves a cell by {max(steps):.3g})")
    return ["samples per cell: " + "; ".join(parts)]
