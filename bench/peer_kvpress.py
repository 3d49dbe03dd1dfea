"""NVIDIA kvpress's presses side by side with kvsqueeze: the same samples, rows in the same results store.

kvpress 0.5.5 pins transformers < 5.3 while kvsqueeze needs >= 5.17, so the two run in two virtual environments,
in two steps (`bench/peer_kvpress.sh` runs both, then kvsqueeze's own sweep, `frontier` and `report`):

1. `samples` (kvsqueeze's venv): generate kvsqueeze's task samples and write them as JSONL with kvpress's columns
   (context, question, answer_prefix, answers, max_new_tokens) plus kvsqueeze's `task`, `sample_id`, `metric`,
   `meta` and the token ids of kvsqueeze's chat-formatted prompt split (`context_ids`, `question_ids`):

       .venv/bin/python bench/peer_kvpress.py samples --tasks passkey,niah_single --length 1024 --samples 2 \\
           -o /tmp/peer_samples.jsonl

2. `run` (kvpress's venv: python3 -m venv /tmp/kvpress-venv && /tmp/kvpress-venv/bin/pip install torch==2.13.0
   kvpress==0.5.5 gguf): every press x compression_ratio on every sample through kvpress's own pipeline
   (`pipeline("kv-press-text-generation")`, question-agnostic: the context is prefilled and compressed, then the
   question is decoded on top), one row per answer written into a kvsqueeze results store:

       /tmp/kvpress-venv/bin/python bench/peer_kvpress.py run /tmp/peer_samples.jsonl --results results/peer.sqlite \\
           --model-dir ~/.cache/kvsqueeze/models/smollm2-135m --presses snapkv,streaming_llm,tova \\
           --compression-ratios 0.5

   This step imports no torch-dependent kvsqueeze code: only `evaluation/store.py` (ResultStore) and
   `tasks/base.py` (the scoring rule) are loaded from `src/`, under stub parent packages, so kvsqueeze's
   `__init__` (which needs transformers >= 5.17) never runs.

Identical inputs. kvsqueeze's `split_prompt` writes the question part as "\\n\\n" + question + the chat template's
tail + answer_prefix, kvpress's pipeline as question + tail + answer_prefix; the peer passes "\\n\\n" + question, and
checks (before any row) that kvpress's tokenizer gives exactly the exported `context_ids` / `question_ids`: both
tools then see the same token ids. The model is the same weights: kvsqueeze's safetensors conversion of the GGUF
(`$KVSQUEEZE_CACHE/models/smollm2-135m`, float32, sdpa), or the GGUF itself with `--gguf DIR/FILE`.

Rows: method `kvpress:<Press class without "Press">` (`kvpress:AdaKV(ExpectedAttention)` for wrappers, `kvpress:none`
for the pipeline without a press, compression_ratio 0), `compression_ratio` = the press's compression_ratio, the
exported task and sample_id (so kvsqueeze's own sweep rows on the same samples line up), `code_version`
"kvpress-0.5.5", `protocol` "kvpress-pipeline", the score by kvsqueeze's rule (`tasks.base.score`: RULER
string_match_all / part).

Bytes. `kv_bytes` is what kvpress's DynamicCache holds after compressing the context (measured by a forward
pre-hook on the question's forward, before the question is appended; KVzip's own reconstruction forwards before
it are skipped); `kv_bytes_16` is the same at 2 bytes
per element; `full_kv_bytes(_16)` is the uncompressed cache of the same context. kvpress frees the evicted
entries for most presses, but AdaKV and KVzip (and the other head-wise presses: CriticalAdaKV, DMS) only *mask*
them: the tensors keep every token, so their rows count every token (factor 1.0, which is what kvpress holds in memory),
and `meta_json` carries `masked: true`, the number of masked entries and `kv_bytes_16_unmasked` (what a
kernel that skipped the masked entries would need to hold). `--quant quanto-4` (or hqq) adds transformers'
QuantizedCache under each press, where its backend is installed. NOT validated: with optimum-quanto 0.2.7 on
CPU the first quantized forward JIT-builds quanto's C++ extension (torch.utils.cpp_extension, g++ with torch's
headers, in site-packages/optimum/quanto/library/extensions/cpp/build). An interrupted build leaves a `lock` file
there, and every later run waits on it forever (`baton.wait()`: the earlier "hang"); with the stale lock removed,
the build had not finished after 4 minutes on the loaded 2-core CPU. Build it once, alone, before a run (and
delete a stale `lock`). hqq is not installed; byte counts of quantized layers are not checked.

Resumable: keys already in the store are skipped; each row is committed as it is computed.

Timing (`run --time`, no store): kvpress's own per-press loop, every press x compression_ratio on every sample,
one pipeline call (one prefill of the context) each, after one untimed warm-up call; prints the wall seconds per
configuration and a `KVPRESS_TIMES {json}` line (seconds, answers) that `bench/sweep_vs_reprefill.py
--kvpress-python` reads to put kvpress's loop beside kvsqueeze's shared and re-prefill sweeps on the same samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
CODE_VERSION = "kvpress-0.5.5"
PROTOCOL = "kvpress-pipeline"


# --- step 1: samples (kvsqueeze's venv) ---------------------------------------------------------------------
def sample_rows(tok, samples, seed: int, model: str) -> list[dict]:
    """kvsqueeze's samples as the JSONL rows `run` reads (kvpress's columns, kvsqueeze's keys and the token ids of
    kvsqueeze's prompt split)."""
    from kvsqueeze.runtime.generate import split_prompt

    out = []
    for s in samples:
        ctx, q = split_prompt(tok, s.context, s.question, s.answer_prefix)
        out.append({
            "context": s.context, "question": s.question, "answer_prefix": s.answer_prefix,
            "answers": s.answers, "max_new_tokens": s.max_new_tokens, "task": s.task, "id": s.sample_id,
            "sample_id": s.sample_id, "metric": s.metric, "meta": s.meta, "seed": seed, "model": model,
            "context_ids": ctx, "question_ids": q,
        })
    return out


def cmd_samples(a) -> None:
    sys.path.insert(0, str(SRC))
    from kvsqueeze.models import load_model
    from kvsqueeze.tasks import TaskConfig, build_samples

    _, tok = load_model(a.model)
    cfg = TaskConfig(length=a.length, samples=a.samples, seed=a.seed, haystack_dir=a.haystack_dir)
    samples = build_samples(tok, a.tasks, cfg)
    if a.interleave:  # task after task, sample by sample: a partial `run` covers every task
        by_task: dict[str, list] = {}
        for smp in samples:
            by_task.setdefault(smp.task, []).append(smp)
        samples = [smp for i in range(max(map(len, by_task.values()))) for group in by_task.values()
                   for smp in group[i : i + 1]]
    with open(a.out, "w") as f:
        for row in sample_rows(tok, samples, a.seed, a.model):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(samples)} samples ({a.tasks}, {a.length} tokens, seed {a.seed}) to {a.out}")


# --- step 2: run (kvpress's venv) -----------------------------------------------------------------------------
def light_kvsqueeze():
    """kvsqueeze's ResultStore and scoring rule without running kvsqueeze's (transformers >= 5.17) __init__: the
    parent packages are empty stubs whose __path__ is src/kvsqueeze/..., so only store.py, tasks/base.py and
    errors.py execute. Where the real package is already imported (kvsqueeze's own venv), it is used as is."""
    real = getattr(sys.modules.get("kvsqueeze"), "__file__", None) is not None
    for name, sub in (("kvsqueeze", ""), ("kvsqueeze.evaluation", "evaluation"), ("kvsqueeze.tasks", "tasks")):
        if not real and name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(SRC / "kvsqueeze" / sub) if sub else str(SRC / "kvsqueeze")]
            sys.modules[name] = mod
    from kvsqueeze.evaluation.store import ResultStore
    from kvsqueeze.tasks.base import Sample, score

    return ResultStore, Sample, score


def build_press(name: str, compression_ratio: float):
    """(label, press or None, masked?) for a press name of PRESSES."""
    import kvpress as kp

    n = name.lower().replace("-", "_")
    simple = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress", "tova": "TOVAPress",
              "knorm": "KnormPress", "expected_attention": "ExpectedAttentionPress", "kvzip": "KVzipPress",
              "pyramidkv": "PyramidKVPress", "random": "RandomPress", "observed_attention": "ObservedAttentionPress",
              "qfilter": "QFilterPress", "lagkv": "LagKVPress", "keydiff": "KeyDiffPress"}
    if n == "none":
        return "kvpress:none", None, False
    if n in simple:
        cls = getattr(kp, simple[n])
        # KVzip, like AdaKV, masks the evicted entries (module.masked_key_indices) instead of freeing them
        return f"kvpress:{simple[n][:-len('Press')]}", cls(compression_ratio=compression_ratio), n == "kvzip"
    if n.startswith("adakv_"):
        inner_label, inner, _ = build_press(n[len("adakv_"):], compression_ratio)
        return f"kvpress:AdaKV({inner_label.split(':', 1)[1]})", kp.AdaKVPress(inner), True
    raise SystemExit(f"error: unknown press {name!r}; choose from none, {', '.join(simple)}, adakv_<press>")


def _leaves(t) -> list:
    """The plain tensors that hold a (possibly quantized) tensor: a tensor subclass (optimum-quanto's
    `WeightQBitsTensor`: packed codes `_data`, `_scale`, `_shift`; its `PackedTensor` codes) is flattened through
    `__tensor_flatten__`, recursively; a plain tensor is itself. Its own `numel() * element_size()` would count
    the dequantized shape at the float dtype, not what is held."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None or type(t).__name__ in ("Tensor", "Parameter"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for n in names for leaf in _leaves(getattr(t, n))]


def cache_bytes(cache) -> tuple[int, int, int]:
    """(bytes held as measured, bytes at 2 bytes per element, tokens of the longest layer) of a transformers cache.

    A `QuantizedCache` layer holds its quantized part (`_quantized_keys` / `_quantized_values`, counted as the
    plain tensors inside them: packed integer codes at their real bytes, float scales and shifts at min(size, 2)
    bytes in the 16-bit figure, as kvsqueeze's `evaluation/sizes.py`) plus its full-precision residual
    (`keys` / `values`)."""
    measured = b16 = tokens = 0
    for layer in cache.layers:
        for attr in ("keys", "values", "_quantized_keys", "_quantized_values"):
            t = getattr(layer, attr, None)
            if t is None or not hasattr(t, "numel"):
                continue
            for leaf in _leaves(t):
                measured += leaf.numel() * leaf.element_size()
                b16 += leaf.numel() * (min(leaf.element_size(), 2) if leaf.is_floating_point()
                                       else leaf.element_size())
        n = 0
        for attr in ("_quantized_keys", "keys"):
            k = getattr(layer, attr, None)
            if k is not None and hasattr(k, "shape") and len(k.shape) == 4:
                n += k.shape[2]
        tokens = max(tokens, n)
    return measured, b16, tokens


def cmd_run(a) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline

    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)

    ResultStore, Sample, score = light_kvsqueeze()
    rows = [json.loads(x) for x in open(a.samples) if x.strip()]
    if not rows:
        raise SystemExit(f"error: {a.samples} holds no samples")
    torch.set_num_threads(a.threads)
    if a.gguf:
        gdir, gfile = str(Path(a.gguf).parent), Path(a.gguf).name
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gfile)
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gfile, dtype=torch.float32)
        source = f"gguf:{a.gguf}"
    else:
        tok = AutoTokenizer.from_pretrained(a.model_dir)
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        source = f"safetensors:{a.model_dir}"
    model.set_attn_implementation("sdpa")
    model.eval()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {a.device}: no CUDA device here")
    model.to(a.device)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device=a.device)
    model_name = a.model_name or rows[0].get("model", "smollm2-135m")

    # identical inputs: kvpress's own preprocessing must give kvsqueeze's token ids
    for r in rows:
        pre = pipe.preprocess(r["context"], ["\n\n" + r["question"]], r.get("answer_prefix") or "",
                              max_context_length=10**9)
        got_c = pre["context_ids"][0].tolist()
        got_q = pre["questions_ids"][0][0].tolist()
        if got_c != r["context_ids"] or got_q != r["question_ids"]:
            raise SystemExit(f"error: {r['task']}/{r['sample_id']}: kvpress's prompt differs from kvsqueeze's "
                             f"({len(got_c)}+{len(got_q)} vs {len(r['context_ids'])}+{len(r['question_ids'])} tokens)")
    print(f"{len(rows)} samples: kvpress's prompt token ids identical to kvsqueeze's", file=sys.stderr)

    compression_ratios = [float(x) for x in a.compression_ratios.split(",") if x.strip()]
    configs = []
    for name in [x.strip() for x in a.presses.split(",") if x.strip()]:
        for r in ([0.0] if name == "none" else compression_ratios):
            label, _, masked = build_press(name, r)
            configs.append((name, r, label, masked))
    quant = None if a.quant == "none" else a.quant
    if a.results is None and not a.time:
        raise SystemExit("error: --results is required (or --time, which stores nothing)")
    store = ResultStore(a.results) if a.results is not None and not a.time else None
    done = store.done_keys(model_name, CODE_VERSION) if store is not None else set()
    params = lambda label: json.dumps({"peer": "kvpress", **({"quant": quant} if quant else {})},  # noqa: E731
                                      sort_keys=True)
    todo = [(r, c) for r in rows for c in configs
            if (model_name, c[2], params(c[2]), float(c[1]), r["task"], r["sample_id"], int(r.get("seed", 0)),
                CODE_VERSION) not in done]
    print(f"{len(todo)} rows to compute ({len(rows) * len(configs) - len(todo)} already stored); "
          f"model {model_name} from {source}", file=sys.stderr)
    from tqdm.auto import tqdm

    if a.time:  # one untimed pipeline call first (first-call allocations and lazy initialisation)
        r0 = rows[0]
        pipe(r0["context"], question="\n\n" + r0["question"], answer_prefix=r0.get("answer_prefix") or "",
             press=None, max_new_tokens=2, cache=make_cache(model, quant))
    times: dict[tuple[str, float], float] = {}
    answers: dict[str, str] = {}
    errors: dict[str, str] = {}
    for r, (name, compression_ratio, label, masked) in tqdm(todo, unit="row", file=sys.stderr, desc="kvpress",
                                                            disable=a.time):
        if label in errors:
            continue
        sample = Sample(r["context"], r["question"], r["answers"], r.get("answer_prefix") or "",
                        r["max_new_tokens"], r["task"], r.get("meta") or {}, r["sample_id"],
                        r.get("metric", "string_match_all"))
        _, press, _ = build_press(name, compression_ratio)
        cache = make_cache(model, quant)
        seen: dict = {}
        n_ctx = len(r["context_ids"])

        n_q = len(r["question_ids"])

        def pre_hook(module, args, kwargs):  # the question's forward: the compressed context alone
            # (KVzip runs its own reconstruction forwards on the context's cache before that: not those)
            ids = kwargs.get("input_ids", args[0] if args else None)
            if "kv" not in seen and kwargs.get("past_key_values") is not None and ids is not None \
                    and ids.shape[-1] == n_q:
                pkv = kwargs["past_key_values"]
                if pkv.get_seq_length() > 0:
                    seen["kv"] = cache_bytes(pkv)
                    seen["masked"] = count_masked(model)
        h = model.model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        t0 = time.perf_counter()
        try:
            out = pipe(r["context"], question="\n\n" + r["question"], answer_prefix=r.get("answer_prefix") or "",
                       press=press, max_new_tokens=r["max_new_tokens"], cache=cache)
        except Exception as e:  # a press that fails on this model / setting: say so once, go on
            errors[label] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"
            print(f"\n{label} fails: {errors[label]}", file=sys.stderr)
            continue
        finally:
            h.remove()
        seconds = time.perf_counter() - t0
        prediction = out["answer"].strip()
        metrics = score(sample, prediction)
        times[(name, compression_ratio)] = times.get((name, compression_ratio), 0.0) + seconds
        answers[f"{r['task']}|{r['sample_id']}|{name}|{compression_ratio}"] = prediction
        if store is None:
            continue
        kv_b, kv16, tokens = seen.get("kv", (None, None, None))
        # the uncompressed 16-bit (and measured, float32) cache of the same context
        cfg = model.config
        kvh = cfg.num_key_value_heads
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        full16 = 2 * cfg.num_hidden_layers * kvh * hd * n_ctx * 2
        meta = {**(r.get("meta") or {}), "peer": "kvpress 0.5.5", "press": repr(press)[:300],
                "model_source": source, "device": a.device, "held_tokens_max_layer": tokens,
                "question_prefix": "\\n\\n (as kvsqueeze's split_prompt)"}
        if masked:
            n_masked = seen.get("masked") or 0
            meta.update(masked=True, masked_entries=n_masked,
                        kv_bytes_16_unmasked=None if kv16 is None else kv16 - n_masked * hd * 2 * 2,
                        note=f"kvpress masks {label.split(':', 1)[1]}'s evicted entries (keys kept in the tensors, "
                             "hidden from attention); kv_bytes count what is held")
        if quant:
            meta["quant"] = quant
        store.add({
            "model": model_name, "method": label, "params_json": params(label), "compression_ratio": compression_ratio,
            "task": r["task"], "sample_id": r["sample_id"], "seed": int(r.get("seed", 0)),
            "code_version": CODE_VERSION, "metric": sample.metric, "score": metrics[sample.metric],
            "metrics_json": metrics, "prediction": prediction, "answers_json": sample.answers,
            "kv_bytes": kv_b, "total_bytes": kv_b, "full_kv_bytes": full16 * 2, "n_context_tokens": n_ctx,
            "n_question_tokens": len(r["question_ids"]), "length": (r.get("meta") or {}).get("length"),
            "depth": (r.get("meta") or {}).get("depth"), "meta_json": meta, "protocol": PROTOCOL,
            "seconds": seconds, "quant": quant, "kv_bytes_16": kv16, "full_kv_bytes_16": full16,
        })
    if store is not None:
        store.close()
    for label, err in errors.items():
        print(f"{label}: error: {err}")
    if a.time:
        print_times(times, answers, len(rows), a.threads)
        return
    print(f"done: {len(todo)} rows attempted, {len(errors)} press(es) failed; results in {a.results}")


def print_times(times: dict, answers: dict, n_samples: int, threads: int) -> None:
    """`run --time`: wall seconds of kvpress's pipeline per configuration (press, compression_ratio), summed over
    the samples, as a table, then one line `KVPRESS_TIMES {json}` (seconds per configuration, the total, and
    every answer keyed task|sample_id|press|compression_ratio) for `bench/sweep_vs_reprefill.py --kvpress-python`."""
    total = sum(times.values())
    print(f"kvpress 0.5.5 pipeline, one call (one prefill) per press and compression_ratio; {n_samples} sample(s), "
          f"torch threads {threads}")
    print("| press | compression_ratio | seconds (all samples) | seconds per sample |")
    print("|---|---|---|---|")
    for (name, r), sec in times.items():
        print(f"| {name} | {r} | {sec:.2f} | {sec / max(n_samples, 1):.2f} |")
    print(f"| total | {len(times)} configurations | {total:.2f} | {total / max(n_samples, 1):.2f} |")
    print("KVPRESS_TIMES " + json.dumps({"seconds": {f"{n}@{r}": v for (n, r), v in times.items()}, "total": total,
                                         "n_configs": len(times), "n_samples": n_samples, "answers": answers}))


def count_masked(model) -> int:
    """Entries (layer x kv head x token) that kvpress's head-wise presses mask instead of evicting."""
    n = 0
    for layer in model.model.layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            n += int(idx[0].numel())
    return n


def make_cache(model, quant: str | None):
    from transformers import DynamicCache

    if quant is None:
        return DynamicCache()
    from transformers import QuantizedCache

    backend, _, bits = quant.partition("-")
    return QuantizedCache(backend=backend, config=model.config, nbits=int(bits or 4))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("samples", help="kvsqueeze's venv: write kvsqueeze's samples as JSONL")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--tasks", default="passkey,niah_single")
    s.add_argument("--length", type=int, default=1024)
    s.add_argument("--samples", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--haystack-dir", default=None)
    s.add_argument("--interleave", action="store_true",
                   help="order the samples task after task (sample 0 of each task, then sample 1, ...)")
    s.add_argument("-o", "--out", required=True)
    r = sub.add_parser("run", help="kvpress's venv: run presses on the JSONL, rows into a results store")
    r.add_argument("samples")
    r.add_argument("--results", default=None, help="results store (required unless --time)")
    r.add_argument("--model-dir", default=str(Path.home() / ".cache" / "kvsqueeze" / "models" / "smollm2-135m"))
    r.add_argument("--gguf", default=None, help="DIR/FILE.gguf instead of --model-dir")
    r.add_argument("--model-name", default=None, help="the model column (default: the samples' model)")
    r.add_argument("--presses", default="none,snapkv,streaming_llm,tova,knorm,expected_attention,"
                                        "adakv_expected_attention,kvzip")
    r.add_argument("--compression-ratios", "--ratios", default="0.5",
                   help="comma-separated fractions of tokens removed (kvpress's compression_ratio)")
    r.add_argument("--quant", default="none", help="none, or transformers' QuantizedCache BACKEND-BITS "
                                                   "(quanto-4, hqq-4) under every press")
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--time", action="store_true",
                   help="time kvpress's per-press loop instead of storing rows: every configuration on every "
                        "sample (nothing skipped, nothing stored), wall seconds per configuration printed")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the weights stay float32)")
    a = ap.parse_args(argv)
    if a.cmd == "samples":
        cmd_samples(a)
    else:
        cmd_run(a)


if __name__ == "__main__":
    main()
