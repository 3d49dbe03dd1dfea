"""Tasks: deterministic for a seed, sized in tokens to the requested length, answers really in the context,
RULER's scoring, and bring-your-own data (JSONL, HF datasets) with clear errors."""

from __future__ import annotations

import collections
import json
import re
import sys
import types
from pathlib import Path

import pytest

from kvsqueeze.errors import KVSqueezeError
from kvsqueeze.tasks import (RULER_TASKS, SYNTHETIC, TaskConfig, build_samples, expand_tasks, load_data,
                             passkey_samples, string_match_all, string_match_part)
from kvsqueeze.tasks.base import prompt_tokens
from kvsqueeze.tasks.haystack import EssayHaystack, ProceduralHaystack, make_haystack

ESSAYS = Path(__file__).resolve().parents[2] / "shared" / "data" / "paul_graham_essays"
QA_TASKS = [t for t in SYNTHETIC if t != "ppl"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from kvsqueeze.models import cache_dir

    saved = cache_dir() / "models" / "smollm2-135m"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    import kvsqueeze as kq

    return kq.load_model("smollm2-135m")[1]


@pytest.mark.parametrize("task", SYNTHETIC)
def test_deterministic_for_a_seed_and_sized_to_the_length(tok, task):
    cfg = TaskConfig(length=1024, samples=2, seed=3)
    a = build_samples(tok, task, cfg)
    b = build_samples(tok, task, cfg)
    c = build_samples(tok, task, TaskConfig(length=1024, samples=2, seed=4))
    assert [s.to_dict() for s in a] == [s.to_dict() for s in b]
    assert [s.context for s in a] != [s.context for s in c]
    assert len({s.sample_id for s in a}) == len(a)
    for s in a:
        n = len(tok(s.context).input_ids) if s.metric == "perplexity" else prompt_tokens(tok, s)
        # prompt + answer budget fits, and the haystack search filled the length (within one haystack unit)
        assert 0.9 * 1024 <= n <= 1024, (task, n)


@pytest.mark.parametrize("length", [700, 3000])
def test_lengths_follow_the_request(tok, length):
    for s in build_samples(tok, "passkey,niah_multivalue,cwe,fwe", TaskConfig(length=length, samples=1)):
        assert 0.9 * length <= prompt_tokens(tok, s) <= length


def test_needles_and_answers_are_in_the_context(tok):
    for s in build_samples(tok, "passkey,niah,niah_single,niah_multikey,niah_multivalue,niah_multiquery",
                           TaskConfig(length=1024, samples=2)):
        assert s.answers
        for a in s.answers:
            assert a in s.context, (s.task, a)
        assert not any(a in s.question for a in s.answers)


def test_multikey_asks_one_of_several_keys(tok):
    s = build_samples(tok, "niah_multikey", TaskConfig(length=1024, samples=1))[0]
    needles = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", s.context)
    assert len(needles) == 4 and len({k for k, _ in needles}) == 4
    asked = [k for k, v in needles if v == s.answers[0]]
    assert len(asked) == 1 and asked[0] in s.question


def test_variable_tracking_chain_resolves_to_the_answers(tok):
    s = build_samples(tok, "vt", TaskConfig(length=1024, samples=1))[0]
    value = re.search(r"value (\d+)", s.question).group(1)
    assigned = dict(re.findall(r"VAR ([A-Z]+) = (\d+|VAR [A-Z]+)\.", s.context))

    def resolve(v):
        while assigned[v].startswith("VAR "):
            v = assigned[v][4:]
        return assigned[v]

    holders = sorted(v for v in assigned if resolve(v) == value)
    assert holders == sorted(s.answers) and len(holders) == 5


def test_common_words_answers_are_the_most_common(tok):
    s = build_samples(tok, "cwe", TaskConfig(length=2048, samples=1))[0]
    words = re.findall(r"\d+\. (\S+)", s.context.split("\n", 1)[1])
    counts = collections.Counter(words)
    top = {w for w, _ in counts.most_common(10)}
    assert top == set(s.answers)
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_frequent_words_answers_are_the_three_most_frequent_coded_words(tok):
    s = build_samples(tok, "fwe", TaskConfig(length=2048, samples=1))[0]
    text = s.context.split("coded words. ", 1)[1].split()
    counts = collections.Counter(w for w in text if w != "....")
    assert counts.most_common(1)[0][1] < text.count("....")  # the dots are rank 1
    assert set(s.answers) == {w for w, _ in counts.most_common(3)}
    assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_niah_grid_cells_and_depths(tok):
    cfg = TaskConfig(length=1024, samples=1, niah_lengths=[512, 1024], niah_depths=[0.0, 0.5, 1.0])
    ss = build_samples(tok, "niah", cfg)
    assert sorted((s.meta["length"], s.meta["depth"]) for s in ss) == sorted(
        (l, d) for l in (512, 1024) for d in (0.0, 0.5, 1.0))
    for s in ss:
        assert 0.9 * s.meta["length"] <= prompt_tokens(tok, s) <= s.meta["length"]
        at = s.context.index(s.answers[0]) / len(s.context)
        assert abs(at - s.meta["depth"]) < 0.15, (s.meta, at)


@pytest.mark.skipif(not ESSAYS.is_dir(), reason=f"no essays at {ESSAYS}")
def test_essay_haystack(tok):
    hay = make_haystack(ESSAYS)
    assert isinstance(hay, EssayHaystack) and hay.tag != ProceduralHaystack().tag
    s = build_samples(tok, "niah", TaskConfig(length=1024, samples=1, niah_depths=[0.5], haystack_dir=str(ESSAYS)))[0]
    sentences = set(hay.units)
    found = [x for x in re.split(r"(?<=[.!?])\s+", s.context) if x in sentences]
    assert len(found) > 10  # the haystack is essay text
    assert hay.tag in s.sample_id


def test_haystack_directory_errors(tmp_path):
    with pytest.raises(KVSqueezeError, match="not found"):
        EssayHaystack(tmp_path / "nope")
    with pytest.raises(KVSqueezeError, match="no .txt"):
        EssayHaystack(tmp_path)


def test_too_short_length_is_a_clear_error(tok):
    with pytest.raises(KVSqueezeError, match="too short"):
        build_samples(tok, "niah_multiquery", TaskConfig(length=100, samples=1))


def test_string_match():
    assert string_match_all("The numbers are 123 and 456.", ["123", "789"]) == 0.5
    assert string_match_all("ALPHA beta", ["alpha", "Beta"]) == 1.0
    assert string_match_part("The numbers are 123 and 456.", ["123", "789"]) == 1.0
    assert string_match_part("nothing here", ["123"]) == 0.0


def test_expand_tasks():
    assert expand_tasks("passkey,ruler") == ["passkey", *RULER_TASKS]
    assert expand_tasks("suite") == SYNTHETIC
    assert expand_tasks("jsonl:x.jsonl,passkey,passkey") == ["jsonl:x.jsonl", "passkey"]
    with pytest.raises(KVSqueezeError, match="unknown task 'bogus'"):
        expand_tasks("passkey,bogus")


def test_passkey_samples_keeps_its_signature(tok):
    s = passkey_samples(tok, 2, 512, seed=1)
    assert len(s) == 2 and all(x.task == "passkey" and x.answers[0] in x.context for x in s)


def _write(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_with_kvpress_columns(tmp_path):
    p = _write(tmp_path / "mine.jsonl", [
        {"context": "Alice owns a red car.", "question": "What colour is Alice's car?", "answer_prefix": "Answer:",
         "answer": ["red"], "max_new_tokens": 5, "task": "colour"},
        {"context": "Bob is 42.", "question": "How old is Bob?", "answers": "42"},
        {"context": "Carol is 7.", "question": "How old is Carol?", "answers": "7"},
    ])
    ss = load_data(f"jsonl:{p}")
    assert [s.task for s in ss] == ["jsonl:mine/colour", "jsonl:mine", "jsonl:mine"]
    assert ss[0].answers == ["red"] and ss[0].max_new_tokens == 5 and ss[0].answer_prefix == "Answer:"
    assert ss[1].answers == ["42"] and ss[1].max_new_tokens == 32
    assert len(load_data(str(p), n=1)) == 2  # at most n per task
    assert ss[1].sample_id != ss[2].sample_id


def test_jsonl_errors(tmp_path):
    with pytest.raises(KVSqueezeError, match="not found"):
        load_data(str(tmp_path / "missing.jsonl"))
    bad = _write(tmp_path / "bad.jsonl", [{"context": "x", "question": "q", "answer": "a"}, "{not json"])
    with pytest.raises(KVSqueezeError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(str(bad))
    miss = _write(tmp_path / "miss.jsonl", [{"context": "x", "question": "q"}])
    with pytest.raises(KVSqueezeError, match=r"miss.jsonl:1: missing column\(s\) answer\(s\)"):
        load_data(str(miss))


def test_hf_datasets_offline_and_columns(monkeypatch):
    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'simonjegou/ruler' on the Hub (LocalEntryNotFoundError)")

    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(KVSqueezeError, match=r"could not load the HF dataset simonjegou/ruler \(4096\).*offline"):
        load_data("ruler-hub")
    calls = []

    def rows(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return [{"context": f"ctx {i}", "question": "q?", "answer_prefix": "", "answer": [str(i)],
                 "task": "niah_single_1" if i % 2 else "vt", "max_new_tokens": 8} for i in range(6)]

    fake.load_dataset = rows
    ss = load_data("ruler-hub:8192", n=2)
    assert calls == [("simonjegou/ruler", "8192", "test")]
    assert sorted(collections.Counter(s.task for s in ss).items()) == [
        ("ruler-hub:8192/niah_single_1", 2), ("ruler-hub:8192/vt", 2)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(KVSqueezeError, match="pip install datasets"):
        load_data("hf:org/name")
