"""bench/peer_kvpress.py: the parts that run without kvpress (sample export, light store import, byte counts)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

from conftest import kv, save_tiny_llama_with_smollm2_tokenizer, tiny_llama

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "peer_kvpress.py"


def _peer():
    spec = importlib.util.spec_from_file_location("peer_kvpress", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_light_import_loads_store_and_scoring_without_torch_code():
    """The kvpress venv has transformers < 5.3: the peer must reach ResultStore and score() without running
    kvsqueeze's __init__ (which imports cache / attention code that needs transformers >= 5.17)."""
    code = (f"import sys, importlib.util; spec = importlib.util.spec_from_file_location('p', {str(SCRIPT)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "RS, Sample, score = m.light_kvsqueeze(); "
            "s = Sample('ctx', 'q', ['7802006'], task='t', sample_id='a#1'); "
            "print(score(s, 'The number is 7802006.')['string_match_all'], score(s, 'nope')['string_match_all']); "
            "print(sorted(k for k in sys.modules if k in ('torch', 'transformers', 'kvsqueeze.runtime.cache', "
            "'kvsqueeze.runtime.generate', 'kvsqueeze.runtime.attention')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "1.0 0.0"
    assert lines[1] == "[]"


def test_rows_written_by_the_light_store_are_read_by_the_cli(tmp_path):
    """A row as the peer writes it goes through `kvsqueeze frontier` next to a kvsqueeze row."""
    rs, _, _ = _peer().light_kvsqueeze()
    store = rs(tmp_path / "r.sqlite")
    base = {"model": "m", "params_json": "{}", "task": "passkey", "sample_id": "s#1", "seed": 0, "metric":
            "string_match_all", "full_kv_bytes_16": 1000, "full_kv_bytes": 2000}
    assert store.add({**base, "method": "full", "compression_ratio": 0.0, "code_version": "0.1.0", "score": 1.0,
                      "kv_bytes": 2000, "kv_bytes_16": 1000})
    assert store.add({**base, "method": "kvpress:SnapKV", "params_json": '{"peer": "kvpress"}', "compression_ratio": 0.5,
                      "code_version": "kvpress-0.5.5", "score": 1.0, "kv_bytes": 1000, "kv_bytes_16": 500})
    store.close()
    from click.testing import CliRunner

    from kvsqueeze.cli import main

    res = CliRunner().invoke(main, ["frontier", str(tmp_path / "r.sqlite")])
    assert res.exit_code == 0, res.output
    assert "kvpress:SnapKV" in res.output and "2.0" in res.output  # factor 1000 / 500


def test_cache_bytes_counts_what_a_dynamic_cache_holds():
    model = tiny_llama(layers=2)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.arange(10)[None], **kv(cache))
    measured, b16, tokens = _peer().cache_bytes(cache)
    per_layer = 2 * 1 * 2 * 10 * 16  # K and V x batch x kv heads x tokens x head_dim
    assert measured == 2 * per_layer * 4  # float32
    assert b16 == 2 * per_layer * 2
    assert tokens == 10


def test_samples_export_keeps_kvsqueeze_ids_and_prompt_tokens(tmp_path):
    """The JSONL carries kvsqueeze's task / sample_id (so rows line up with its sweep) and the prompt split."""
    import kvsqueeze as kq
    from kvsqueeze.runtime.generate import split_prompt
    from kvsqueeze.tasks import TaskConfig, build_samples

    d = save_tiny_llama_with_smollm2_tokenizer(tmp_path / "m")
    out = tmp_path / "s.jsonl"
    peer = _peer()
    peer.main(["samples", "--model", str(d), "--tasks", "passkey", "--length", "200", "--samples", "2",
               "-o", str(out)])
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    _, tok = kq.load_model(str(d))
    want = build_samples(tok, "passkey", TaskConfig(length=200, samples=2))
    assert [(r["task"], r["sample_id"]) for r in rows] == [(s.task, s.sample_id) for s in want]
    ctx, q = split_prompt(tok, want[1].context, want[1].question, want[1].answer_prefix)
    assert rows[1]["context_ids"] == ctx and rows[1]["question_ids"] == q
    assert rows[1]["answers"] == want[1].answers and rows[1]["max_new_tokens"] == want[1].max_new_tokens
