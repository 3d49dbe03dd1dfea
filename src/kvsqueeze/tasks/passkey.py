"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden at a random depth in repeated filler."""

from __future__ import annotations

import random

from .base import Sample, fit_sample

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? Answer with the number only."


def passkey_samples(tokenizer, n: int, length: int, seed: int = 0, max_new_tokens: int = 16) -> list[Sample]:
    """`n` samples whose prompt + answer budget is about `length` tokens of `tokenizer`, deterministic for `seed`."""
    out = []
    for i in range(n):
        rng = random.Random(f"passkey-{seed}-{length}-{i}")
        key = str(rng.randint(10000, 99999))
        depth = rng.random()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "

        def build(reps: int, depth=depth, needle=needle) -> Sample:
            at = int(reps * depth)
            return Sample(INTRO + FILLER * at + needle + FILLER * (reps - at), QUESTION, [key],
                          max_new_tokens=max_new_tokens, task="passkey",
                          meta={"depth": round(depth, 3), "length": length}, sample_id=f"L{length}-{i}")

        out.append(fit_sample(tokenizer, build, length, "passkey").finalize())
    return out
