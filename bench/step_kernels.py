"""Counts the kernels of the compiled static decode step per selector, from inductor's generated code (CPU).

    python bench/step_kernels.py                 # ~2 minutes on 2 cores
    python bench/step_kernels.py --layers 8

A tiny random Llama (`--layers` layers, 4 query / 2 kv heads, head_dim 16; layer 0 dense), a 300-token prompt, the
static step compiled by inductor (CPU backend) without selection, with Quest and with AttentionPredictor (budget
64). From the generated `call` function it prints the fused kernels, the extern calls (matrix products,
convolutions) and the aten fallbacks, and the launches each selector adds per sparse layer. On a GPU each is a
kernel launch of the step's CUDA graph (inductor's CUDA fusion differs somewhat, and Quest's bound is one Triton
kernel there): what a launch-bound step pays at every layer.
"""

from __future__ import annotations

import argparse
import re
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def count(model, selector, ids) -> int:
    import torch._dynamo
    from torch._inductor.utils import run_and_get_code

    import kvsqueeze as kq
    from kvsqueeze.runtime.generate import prefill
    from kvsqueeze.runtime.static import StaticCompressedCache, StaticDecoder

    cache = kq.CompressedCache(model, None, selector=selector)
    tok = prefill(model, cache, ids).argmax(-1)
    torch._dynamo.reset()
    step = StaticDecoder(model, StaticCompressedCache.from_cache(cache, 8), compile=True)
    _, code = run_and_get_code(lambda: step(tok))
    src = "\n".join(code)
    call = src[src.rfind("def call("):]
    parts = {"fused": r"\bcpp_fused_\w+\(", "extern": r"extern_kernels\.\w+\(", "aten": r"torch\.ops\.aten\.\w+\.\w+\("}
    found = {k: len(re.findall(p, call)) for k, p in parts.items()}
    print("  " + ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
    return sum(found.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="Decoder layers (layer 0 dense, the rest sparse).")
    args = ap.parse_args(argv)
    if args.layers < 2:
        print("error: --layers must be at least 2 (layer 0 is dense)", file=sys.stderr)
        return 2
    from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest

    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=args.layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(1, 101, (1, 300), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    selectors = {"none": None, "quest": Quest(64, dense_layers=(0,)),
                 "attention_predictor": AttentionPredictor(64, predictor=PredictorNet(), sink=16, local=16,
                                                           dense_layers=(0,))}
    totals = {}
    for name, sel in selectors.items():
        print(f"{name}:")
        totals[name] = count(model, sel, ids)
    sparse = args.layers - 1
    for name in ("quest", "attention_predictor"):
        print(f"{name}: {totals[name]} launches per step, {(totals[name] - totals['none']) / sparse:.1f} per sparse "
              f"layer above no selection ({totals['none']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
