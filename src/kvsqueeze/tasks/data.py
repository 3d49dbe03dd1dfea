"""Bring your own data: JSONL files or HF datasets with kvpress's columns, so one file runs through both tools.

Columns (as in kvpress's datasets): `context`, `question`, `answer_prefix` (optional), `answer` or `answers`
(a string or a list of strings), `max_new_tokens` (optional, default 32), `task` (optional: rows are grouped by
it), `id` (optional). Predictions are scored with RULER's string_match_all (and string_match_part is stored too).

Specs understood by `load_data`:
    jsonl:PATH, or any PATH ending in .jsonl     a local file
    hf:ORG/NAME[:DATA_DIR]                        `datasets.load_dataset(ORG/NAME, data_dir=DATA_DIR, split="test")`
    longbench[:SUBSET]                            kvpress's LongBench (Xnhyacinth/LongBench)
    ruler-hub[:LENGTH]                            kvpress's RULER (simonjegou/ruler, default 4096)
The hub needs the `datasets` package and a network (or a filled HF cache); without them the error says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import KVSqueezeError
from .base import Sample

HUB_ALIASES = {"longbench": ("Xnhyacinth/LongBench", None), "ruler-hub": ("simonjegou/ruler", "4096")}


def is_data_spec(spec: str) -> bool:
    head = spec.split(":", 1)[0]
    return spec.startswith(("jsonl:", "hf:")) or spec.endswith(".jsonl") or head in HUB_ALIASES


def row_to_sample(row: dict, default_task: str, index: int, where: str) -> Sample:
    missing = [c for c in ("context", "question") if c not in row]
    if "answer" not in row and "answers" not in row:
        missing.append("answer(s)")
    if missing:
        raise KVSqueezeError(f"{where}: missing column(s) {', '.join(missing)} (kvpress's columns: context, "
                             "question, answer_prefix, answer/answers, max_new_tokens)")
    answers = row.get("answers", row.get("answer"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, (list, tuple)) or not all(isinstance(a, (str, int, float)) for a in answers):
        raise KVSqueezeError(f"{where}: answer(s) must be a string or a list of strings")
    context = row["context"]
    if not isinstance(context, str) or not context.strip():
        raise KVSqueezeError(f"{where}: the context is empty")
    try:
        max_new = int(row.get("max_new_tokens") or 32)
    except (TypeError, ValueError):
        raise KVSqueezeError(f"{where}: max_new_tokens must be an integer") from None
    task = str(row.get("task") or default_task)
    if row.get("task") and not task.startswith(default_task):
        task = f"{default_task}/{task}"
    ident = row.get("id", row.get("sample_id", index))
    return Sample(context, str(row["question"] or ""), [str(a) for a in answers], str(row.get("answer_prefix") or ""),
                  max_new, task, meta={"source": default_task}, sample_id=str(ident)).finalize()


def _limit(samples: list[Sample], n: int | None) -> list[Sample]:
    if n is None:
        return samples
    per_task: dict[str, int] = {}
    out = []
    for s in samples:
        if per_task.get(s.task, 0) < n:
            per_task[s.task] = per_task.get(s.task, 0) + 1
            out.append(s)
    return out


def load_jsonl(path: str | Path, n: int | None = None) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise KVSqueezeError(f"data file not found: {path}")
    samples = []
    for i, line in enumerate(path.read_text(errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise KVSqueezeError(f"{path}:{i + 1}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise KVSqueezeError(f"{path}:{i + 1}: each line must be a JSON object")
        samples.append(row_to_sample(row, f"jsonl:{path.stem}", i, f"{path}:{i + 1}"))
    if not samples:
        raise KVSqueezeError(f"data file {path} holds no rows")
    return _limit(samples, n)


def load_hf(name: str, data_dir: str | None = None, split: str = "test", n: int | None = None,
            task: str | None = None) -> list[Sample]:
    try:
        import datasets
    except ImportError:
        raise KVSqueezeError(f"loading {name} from the HF hub needs the `datasets` package: "
                             "pip install datasets (or kvsqueeze[hub])") from None
    try:
        ds = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as e:  # offline, unknown name, bad data_dir: one line, no traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KVSqueezeError(f"could not load the HF dataset {name}"
                             f"{' (' + data_dir + ')' if data_dir else ''}: {first} "
                             "(offline? use a JSONL file, or fill the HF cache when online)") from None
    label = task or f"hf:{name}{':' + data_dir if data_dir else ''}"
    samples = []
    for i, row in enumerate(ds):
        samples.append(row_to_sample(dict(row), label, i, f"{label} row {i}"))
        if n is not None and not any(c in row for c in ("task",)) and len(samples) >= n:
            break
    return _limit(samples, n)


def load_data(spec: str, n: int | None = None) -> list[Sample]:
    if spec.startswith("jsonl:"):
        return load_jsonl(spec[len("jsonl:"):], n)
    if spec.endswith(".jsonl") and not spec.startswith("hf:"):
        return load_jsonl(spec, n)
    if spec.startswith("hf:"):
        rest = spec[3:]
        name, _, data_dir = rest.partition(":")
        if not name:
            raise KVSqueezeError(f"bad data spec {spec!r}: use hf:ORG/NAME[:DATA_DIR]")
        return load_hf(name, data_dir or None, n=n)
    alias, _, sub = spec.partition(":")
    if alias in HUB_ALIASES:
        repo, default = HUB_ALIASES[alias]
        return load_hf(repo, sub or default, n=n, task=alias + (f":{sub}" if sub else ""))
    raise KVSqueezeError(f"bad data spec {spec!r}")
