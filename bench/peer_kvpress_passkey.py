"""Run the same passkey JSONL through NVIDIA's kvpress (the peer), question-agnostic, for comparison.

kvpress 0.5.5 needs transformers < 5.3, so it lives in its own venv:
    python3 -m venv /tmp/kvp && /tmp/kvp/bin/pip install torch==2.13.0 kvpress==0.5.5
    /tmp/kvp/bin/python bench/peer_kvpress_passkey.py /tmp/passkey_2k.jsonl --model-dir ~/.cache/kvsqueeze/models/smollm2-135m
(the model dir is the safetensors copy kvsqueeze.load_model writes, so both tools run the same weights).
"""

import argparse
import json
import time

import torch
from kvpress import (KnormPress, PyramidKVPress, RandomPress, SnapKVPress, StreamingLLMPress, TOVAPress)
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

ap = argparse.ArgumentParser()
ap.add_argument("data")
ap.add_argument("--model-dir", required=True)
ap.add_argument("--ratios", default="0.5,0.75,0.875")
ap.add_argument("--presses", default="streaming_llm,snapkv,pyramidkv,tova,knorm,random")
a = ap.parse_args()
rows = [json.loads(x) for x in open(a.data)]
tok = AutoTokenizer.from_pretrained(a.model_dir)
model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
presses = {"streaming_llm": StreamingLLMPress, "snapkv": SnapKVPress, "pyramidkv": PyramidKVPress,
           "tova": TOVAPress, "knorm": KnormPress, "random": RandomPress}
print("| method | " + " | ".join(a.ratios.split(",")) + " |")
for name in a.presses.split(","):
    cls = presses[name]
    cells = []
    for r in map(float, a.ratios.split(",")):
        t = time.time()
        ok = 0
        try:
            for row in rows:
                out = pipe(row["context"], question=row["question"], press=cls(compression_ratio=r),
                           max_new_tokens=row["max_new_tokens"])["answer"]
                ok += any(ans in out for ans in row["answers"])
            cells.append(f"{ok}/{len(rows)}")
        except Exception as e:  # report the peer's failure and go on
            cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
