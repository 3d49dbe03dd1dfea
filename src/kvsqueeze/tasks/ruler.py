"""RULER-style synthetic tasks (Hsieh et al., 2024, "RULER: What's the Real Context Size of Your Long-Context
Language Models?"), written from the paper's published recipes (kvsqueeze's own code):

- `niah_single`: one needle "One of the special magic numbers for <key> is: <7-digit number>." in the haystack;
- `niah_multikey`: four needles with different keys, one is asked (the others are distractors);
- `niah_multivalue`: four needles with the same key, all four values are asked;
- `niah_multiquery`: four needles with different keys, all four are asked;
- `vt` (variable tracking): a chain "VAR A = 12345.", "VAR B = VAR A.", ... (1 chain, 4 hops) hidden in noise;
  name every variable holding the value;
- `cwe` (common words extraction): a numbered list where 10 words appear often and many appear a few times;
  name the 10 most common;
- `fwe` (frequent words extraction): "coded" words drawn from a Zipf distribution (alpha = 2), the most frequent
  being dots; name the three most frequent coded words.

Each sample's haystack (sentences, list entries or coded words) is sized by binary search so that the prompt plus
the answer budget fills the requested length, as RULER does. Scoring: RULER's string_match_all (fraction of the
references found in the prediction, case-insensitive) for every task here. Keys are "adjective-noun" words,
values 7-digit numbers. Deviations (CPU-sized): answer budgets are 32-64 new tokens instead of RULER's 30-128,
no few-shot example in cwe / fwe, and cwe lowers the frequency of common words (30 in RULER) so that they fill
at most half of a short context.
"""

from __future__ import annotations

import random
import string

from .base import Sample, fit_sample
from .haystack import Haystack, NoiseHaystack, ProceduralHaystack, insert_at_depths
from .words import ADJECTIVES, NOUNS, VERBS_PAST

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the numbers afterwards.\n")


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in taken:
            taken.add(k)
            return k


def _value(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = str(rng.randint(1_000_000, 9_999_999))
        if v not in taken:
            taken.add(v)
            return v


def _niah(tokenizer, task: str, n: int, length: int, seed: int, haystack: Haystack | None,
          n_keys: int, n_values: int, n_queries: int, max_new_tokens: int) -> list[Sample]:
    haystack = haystack or ProceduralHaystack(seed)
    out = []
    for i in range(n):
        rng = random.Random(f"{task}-{seed}-{length}-{i}")
        keys_taken: set[str] = set()
        vals_taken: set[str] = set()
        keys = [_key(rng, keys_taken) for _ in range(n_keys)]
        values = [[_value(rng, vals_taken) for _ in range(n_values)] for _ in keys]
        needles = [(rng.random(), f"One of the special magic numbers for {k} is: {v}.")
                   for k, vs in zip(keys, values) for v in vs]
        asked = keys[:n_queries]
        answers = [v for vs in values[:n_queries] for v in vs]
        query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        question = f"What are all the special magic numbers for {query} mentioned in the provided text?"
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
        state = rng.getstate()

        def build(m, needles=needles, question=question, prefix=prefix, answers=answers, i=i, state=state):
            r = random.Random()
            r.setstate(state)
            context = NIAH_INTRO + insert_at_depths(haystack.sentences(m, r), needles)
            return Sample(context, question, answers, prefix, max_new_tokens, task,
                          meta={"length": length, "depth": round(needles[0][0], 3)},
                          sample_id=f"L{length}-{i}-{haystack.tag}")

        out.append(fit_sample(tokenizer, build, length, task).finalize())
    return out


def niah_single(tokenizer, n, length, seed=0, haystack=None):
    return _niah(tokenizer, "niah_single", n, length, seed, haystack, 1, 1, 1, 32)


def niah_multikey(tokenizer, n, length, seed=0, haystack=None):
    return _niah(tokenizer, "niah_multikey", n, length, seed, haystack, 4, 1, 1, 32)


def niah_multivalue(tokenizer, n, length, seed=0, haystack=None):
    return _niah(tokenizer, "niah_multivalue", n, length, seed, haystack, 1, 4, 1, 64)


def niah_multiquery(tokenizer, n, length, seed=0, haystack=None):
    return _niah(tokenizer, "niah_multiquery", n, length, seed, haystack, 4, 1, 4, 64)


def _var_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        v = "".join(rng.choices(string.ascii_uppercase, k=5))
        if v not in taken:
            taken.add(v)
            return v


def variable_tracking(tokenizer, n, length, seed=0, haystack=None, n_chains: int = 1, n_hops: int = 4):
    """RULER's variable tracking: chains of assignments hidden in noise (the haystack argument is not used)."""
    noise = NoiseHaystack()
    out = []
    for i in range(n):
        rng = random.Random(f"vt-{seed}-{length}-{i}")
        names: set[str] = set()
        vals: set[str] = set()
        chains, asked_value, asked_vars = [], None, None
        for c in range(n_chains):
            value = str(rng.randint(10000, 99999))
            while value in vals:
                value = str(rng.randint(10000, 99999))
            vals.add(value)
            vs = [_var_name(rng, names) for _ in range(n_hops + 1)]
            stmts = [f"VAR {vs[0]} = {value}."] + [f"VAR {vs[j + 1]} = VAR {vs[j]}." for j in range(n_hops)]
            chains.append(stmts)
            if c == 0:
                asked_value, asked_vars = value, vs
        # statements keep their order inside a chain: sorted random depths
        needles = []
        for stmts in chains:
            depths = sorted(rng.random() for _ in stmts)
            needles.extend((d + k * 1e-9, s) for k, (d, s) in enumerate(zip(depths, stmts)))
        question = f"Find all variables that are assigned the value {asked_value} in the text above."
        prefix = (f"According to the chain(s) of variable assignment in the text above, {len(asked_vars)} variables "
                  f"are assigned the value {asked_value}, they are:")

        def build(m, needles=needles, question=question, prefix=prefix, answers=asked_vars, i=i):
            context = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                       + insert_at_depths(noise.sentences(m, random.Random(0)), needles))
            return Sample(context, question, list(answers), prefix, 32, "vt", meta={"length": length},
                          sample_id=f"L{length}-{i}")

        out.append(fit_sample(tokenizer, build, length, "vt").finalize())
    return out


def _word_pool(rng: random.Random, need: int) -> list[str]:
    pool = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS_PAST))
    rng.shuffle(pool)
    if need > len(pool):  # long contexts: compound words ("bluebasket") widen the vocabulary
        extra = [a + b for a in ADJECTIVES for b in NOUNS]
        rng.shuffle(extra)
        pool += extra
    return pool[:need]


def common_words(tokenizer, n, length, seed=0, haystack=None, n_common: int = 10, freq_common: int = 30,
                 freq_uncommon: int = 3):
    """RULER's common words extraction (the haystack argument is not used)."""
    # how many tokens one list entry takes, to cap the common words at half the context
    probe = " ".join(f"{k + 1}. {w}" for k, w in enumerate(_word_pool(random.Random(0), 200)))
    per_entry = len(tokenizer(probe, add_special_tokens=False).input_ids) / 200
    freq_common = max(freq_uncommon + 2, min(freq_common, int(0.5 * length / (n_common * per_entry))))
    out = []
    for i in range(n):
        rng = random.Random(f"cwe-{seed}-{length}-{i}")
        max_words = n_common + int(length / per_entry / freq_uncommon) + 10
        pool = _word_pool(rng, max_words)
        common, rest = pool[:n_common], pool[n_common:]
        order_seed = rng.randrange(2**31)

        def build(m, common=common, rest=rest, order_seed=order_seed, i=i):
            words = common * freq_common + rest[:m] * freq_uncommon
            random.Random(order_seed).shuffle(words)
            context = ("Below is a numbered list of words. In these words, some appear more often than others. "
                       "Memorize the ones that appear most often.\n"
                       + " ".join(f"{k + 1}. {w}" for k, w in enumerate(words)))
            return Sample(context, f"What are the {n_common} most common words in the above list?", list(common),
                          f"The top {n_common} words that appear most often in the list are:", 64, "cwe",
                          meta={"length": length, "freq_common": freq_common}, sample_id=f"L{length}-{i}")

        out.append(fit_sample(tokenizer, build, length, "cwe").finalize())
    return out


def _zipf_counts(total: int, vocab: int, alpha: float) -> list[int]:
    weights = [k ** -alpha for k in range(1, vocab + 1)]
    z = sum(weights)
    counts = [round(total * w / z) for w in weights]  # the long tail rounds to 0: only sampled words appear
    # the three asked words (ranks 2-4) must be strictly more frequent than every other coded word
    for k in range(4, 0, -1):
        if counts[k - 1] <= counts[k]:
            counts[k - 1] = counts[k] + 1
    return counts


def freq_words(tokenizer, n, length, seed=0, haystack=None, alpha: float = 2.0, vocab: int = 2000):
    """RULER's frequent words extraction (the haystack argument is not used). Rank 1 is the dots '....'."""
    out = []
    for i in range(n):
        rng = random.Random(f"fwe-{seed}-{length}-{i}")
        coded: list[str] = []
        seen: set[str] = set()
        while len(coded) < vocab - 1:
            w = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
            if w not in seen:
                seen.add(w)
                coded.append(w)
        words = ["...."] + coded
        order_seed = rng.randrange(2**31)

        def build(m, words=words, order_seed=order_seed, i=i):
            counts = _zipf_counts(m, len(words), alpha)
            text = [w for w, c in zip(words, counts) for _ in range(c)]
            random.Random(order_seed).shuffle(text)
            context = ("Read the following coded text and track the frequency of each coded word. Find the three "
                       "most frequently appeared coded words. " + " ".join(text))
            question = ("Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                        "frequently appeared words in the above coded text?")
            return Sample(context, question, words[1:4],
                          "According to the coded text above, the three most frequently appeared words are:", 32,
                          "fwe", meta={"length": length}, sample_id=f"L{length}-{i}")

        out.append(fit_sample(tokenizer, build, length, "fwe").finalize())
    return out


RULER_TASKS = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": variable_tracking,
    "cwe": common_words,
    "fwe": freq_words,
}
