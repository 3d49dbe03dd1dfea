"""Long-text perplexity with a capped cache (the generation setting of the Q-Filters paper, Godey et al., 2025).

A text of `length` tokens is read by the model with its KV cache capped: the prefix is prefilled and compressed to the
method's budget, then the last `n_scored` tokens are fed one at a time with the method compressing at every step
(`compression_interval=1`), so the cache never holds more than the budget (+1 while a token is processed). The score
is the perplexity of those `n_scored` tokens, exp(mean NLL); lower is better. A compression_ratio r caps the cache at
int(n_prefix * (1 - r)) tokens per layer, as a prefill compression at that compression_ratio would.

The text comes from the essay haystack when a directory is given, the procedural haystack otherwise.
"""

from __future__ import annotations

import random

from ..errors import KVSqueezeError
from .base import Sample, _largest
from .haystack import Haystack, ProceduralHaystack


def perplexity_samples(tokenizer, n: int, length: int, seed: int = 0, haystack: Haystack | None = None,
                       n_scored: int = 64) -> list[Sample]:
    haystack = haystack or ProceduralHaystack(seed)
    if n_scored >= length // 2:
        raise KVSqueezeError(f"perplexity: {n_scored} scored tokens need a length above {2 * n_scored} tokens")
    out = []
    for i in range(n):
        state = random.Random(f"ppl-{seed}-{length}-{i}").getstate()

        def build(m, state=state):
            r = random.Random()
            r.setstate(state)
            return " ".join(haystack.sentences(m, r))

        count = lambda m: len(tokenizer(build(m)).input_ids)  # noqa: E731
        text = build(_largest(count, length))
        out.append(Sample(text, "", [], max_new_tokens=0, task="ppl",
                          meta={"length": length, "n_scored": n_scored},
                          sample_id=f"L{length}-{i}-{haystack.tag}", metric="perplexity").finalize())
    return out
