"""Write passkey samples as JSONL with kvpress's columns, so the same file runs through kvsqueeze and kvpress.

    .venv/bin/python bench/make_passkey_jsonl.py --length 2000 -n 10 -o /tmp/passkey_2k.jsonl
"""

import argparse
import json

import kvsqueeze as kq
from kvsqueeze.tasks.passkey import passkey_samples

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--length", type=int, default=2000)
ap.add_argument("-n", type=int, default=10)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("-o", "--out", required=True)
a = ap.parse_args()
_, tok = kq.load_model(a.model)
with open(a.out, "w") as f:
    for s in passkey_samples(tok, a.n, a.length, a.seed):
        f.write(json.dumps({"context": s.context, "question": s.question, "answer_prefix": s.answer_prefix,
                            "answers": s.answers, "max_new_tokens": s.max_new_tokens}) + "\n")
print(f"wrote {a.n} samples to {a.out}")
