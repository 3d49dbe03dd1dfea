"""The issue-9 item-11 case on a GPU: decode-time selection and eviction with a model on CUDA at real shapes.

Llama-3.1-8B's shapes (random bf16 weights: nothing can be downloaded on the GPU machine), a context of
`--context` tokens prefilled in chunks, then `--steps` greedy decoding steps, for each of: AttentionPredictor and
Quest at `--budget` (an untrained predictor built here: the point is that everything the selector owns follows the
model to the GPU, not its accuracy), K-norm at 8x and KIVI-4 storage. Prints one line per configuration: ok,
ms per decoding step (median; this script is a correctness smoke, the speed bench is bench/gpu_decode.py's job),
the device of every tensor the selector or method owns, and whether the logits are finite.

    python bench/gpu_selector_smoke.py --context 32768 --budget 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvsqueeze as kq
from kvsqueeze.runtime.generate import decode_step, prefill
from kvsqueeze.quant import parse_quant
from kvsqueeze.selection import AttentionPredictor, PredictorNet, Quest

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def owned_devices(obj) -> dict[str, list[str]]:
    """Device -> attribute paths of every tensor reachable from a selector's / method's attributes (a few levels
    of containers and objects deep)."""
    found: dict[str, list[str]] = {}

    def visit(v, path, depth=0):
        if isinstance(v, torch.Tensor):
            found.setdefault(str(v.device), []).append(path)
        elif isinstance(v, torch.nn.Module):
            for n, p in v.named_parameters():
                found.setdefault(str(p.device), []).append(f"{path}.{n}")
        elif depth < 4 and isinstance(v, dict):
            for k, x in v.items():
                visit(x, f"{path}[{k!r}]", depth + 1)
        elif depth < 4 and isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                visit(x, f"{path}[{i}]", depth + 1)
        elif depth < 3 and hasattr(v, "__dict__") and not isinstance(v, type):
            for k, x in vars(v).items():
                visit(x, f"{path}.{k}", depth + 1)

    visit(obj, "")
    return found


def where(found: dict[str, list[str]]) -> str:
    """'cuda:0 (n tensors)', with the paths of any tensor elsewhere."""
    if not found:
        return "(none)"
    return "; ".join(f"{d} ({len(p)} tensors)" if d.startswith("cuda") else f"{d}: {', '.join(p[:6])}"
                     for d, p in sorted(found.items()))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this smoke test needs a CUDA GPU")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": args.layers}, attn_implementation="sdpa")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, args.context), device="cuda")
    configs = {
        "attention_predictor": dict(selector=AttentionPredictor(args.budget, predictor=PredictorNet().init_blend())),
        "quest": dict(selector=Quest(args.budget)),
        "knorm 8x": dict(method=kq.get_method("knorm", compression_ratio=0.875)),
        "knorm 8x + kivi-4": dict(method=kq.get_method("knorm", compression_ratio=0.875),
                                  layer_factory=parse_quant("kivi-4").layer_factory),
    }
    for name, kw in configs.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        cache = kq.CompressedCache(model, kw.get("method"), layer_factory=kw.get("layer_factory"),
                                   selector=kw.get("selector"))
        try:
            logits = prefill(model, cache, ids, chunk_size=args.chunk)
            token = logits.argmax(-1)
            times, finite = [], bool(torch.isfinite(logits).all())
            for _ in range(args.steps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = decode_step(model, cache, token)
                torch.cuda.synchronize()
                times.append(1000 * (time.perf_counter() - t0))
                finite &= bool(torch.isfinite(out).all())
                token = out.argmax(-1)
            owner = kw.get("selector") or kw.get("method")
            print(f"{name}: ok; decode {statistics.median(times):.1f} ms/step (median of {args.steps}, eager, "
                  f"uncompiled); owned tensors on {where(owned_devices(owner))}; logits finite: "
                  f"{finite}; {cache.stats().line()}; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB",
                  flush=True)
        except Exception as e:  # report and go on: every configuration gets its line
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
        del cache


if __name__ == "__main__":
    main()
