"""Bytes held per quantized token and kv head (keys + values) for every scheme, measured from the layers' tensors.

    .venv/bin/python bench/quant_bytes_per_token.py

4096 quantized tokens + a 32-token residual of random fp16 keys/values per head; the residual's bytes are taken
out, so the numbers are the per-token cost of the compressed part (the residual adds 32..63 fp16 tokens per layer
and kv head). KIVI is also checked against its closed form (`kivi_bytes_per_token`).
"""

import torch

from kvsqueeze.quant import gear, kivi, kivi_bytes_per_token, mikv, zipcache


def measure(layer, k, v, split=None) -> float:
    layer.update(k, v)
    if split is not None:  # mixed precision: a random `split` share of the tokens in high precision
        layer.split(torch.rand(1, 1, k.shape[2]), int(k.shape[2] * split))
    layer.commit()
    res = layer.store.residual_keys.shape[2]
    held = layer.kv_nbytes() - res * 2 * k.shape[-1] * k.element_size()
    return held / (layer.n_stored - res)


def main():
    torch.manual_seed(0)
    n = 4096 + 32
    print("| scheme | d = 128 | x smaller | d = 64 | x smaller |\n|---|---|---|---|---|")
    schemes = [
        ("KIVI-8", kivi(bits=8), None), ("KIVI-4", kivi(bits=4), None),
        ("KIVI-2", kivi(bits=2), None), ("GEAR-4 (r = d/32, 2% outliers)", gear(bits=4), None),
        ("GEAR-2", gear(bits=2), None), ("MiKV-8-2, 25% at 8 bits", mikv(8, 2), 0.25),
        ("MiKV-16-2, 25% in fp16", mikv(16, 2), 0.25), ("ZipCache-4-2, 50% at 4 bits", zipcache(4, 2), 0.5),
    ]
    data = {d: (torch.randn(1, 1, n, d).half(), torch.randn(1, 1, n, d).half()) for d in (128, 64)}
    for name, make, split in schemes:
        cells = []
        for d, (k, v) in data.items():
            bpt = measure(make(), k, v, split)
            cells.append(f"{bpt:.1f} | {4 * d / bpt:.2f}x")
            if name.startswith("KIVI"):
                assert bpt == kivi_bytes_per_token(d, int(name[-1])), (name, d, bpt)
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
