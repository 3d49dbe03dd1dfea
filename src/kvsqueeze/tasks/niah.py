"""Needle in a haystack (Kamradt, 2023) over a grid of context lengths x needle depths.

A needle sentence carrying a random 7-digit number is placed at a fraction `depth` of the haystack (0 = first
sentence, 1 = last), the haystack being sized so that the prompt + answer fill each length; the question asks
for the number. Scored by exact containment of the number (RULER's string_match_all with one reference).
Essay haystack from a directory of `.txt` files (as the original test's Paul Graham essays), a procedural
haystack otherwise.
"""

from __future__ import annotations

import random

from .base import Sample, fit_sample
from .haystack import Haystack, ProceduralHaystack, insert_at_depths
from .words import ADJECTIVES, NOUNS

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def niah_samples(tokenizer, lengths: list[int], depths: list[float] = DEFAULT_DEPTHS, per_cell: int = 1,
                 seed: int = 0, haystack: Haystack | None = None, max_new_tokens: int = 24) -> list[Sample]:
    """`per_cell` samples for every (length, depth) cell, deterministic for `seed`."""
    haystack = haystack or ProceduralHaystack(seed)
    out = []
    for length in lengths:
        for depth in depths:
            for rep in range(per_cell):
                rng = random.Random(f"niah-{seed}-{length}-{depth}-{rep}")
                thing = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
                value = str(rng.randint(1_000_000, 9_999_999))
                needle = f"The special magic number of the {thing} is {value}."
                question = f"What is the special magic number of the {thing}? Answer with the number only."
                hay_rng_state = rng.getstate()

                def build(n, needle=needle, question=question, value=value, depth=depth, length=length,
                          rep=rep, state=hay_rng_state) -> Sample:
                    r = random.Random()
                    r.setstate(state)
                    context = ("A special magic number is hidden in the following text. Memorize it.\n\n"
                               + insert_at_depths(haystack.sentences(n, r), [(depth, needle)]))
                    return Sample(context, question, [value], max_new_tokens=max_new_tokens, task="niah",
                                  meta={"depth": depth, "length": length},
                                  sample_id=f"L{length}-d{depth:g}-{rep}-{haystack.tag}")

                out.append(fit_sample(tokenizer, build, length, "niah").finalize())
    return out
