"""Haystacks: the filler text that tasks hide their needles in, as a list of sentences.

- `EssayHaystack(directory)`: the sentences of every `.txt` file of a directory (sorted by name), e.g. Paul
  Graham's essays as in Kamradt's needle-in-a-haystack test and RULER's NIAH tasks;
- `ProceduralHaystack()`: grammatical sentences made from a fixed word list, deterministic for a seed (the
  default: no data directory needed);
- `NoiseHaystack()`: RULER's repeated noise ("The grass is green. The sky is blue. ...").

`sentences(n, rng)` returns `n` sentences starting at a position drawn from `rng` (wrapping around), so samples of
one task see different text and the same seed gives the same text.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from ..errors import KVSqueezeError
from .words import ADJECTIVES, NOUNS, PREPOSITIONS, VERBS_PAST

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


class Haystack:
    name = "haystack"

    def sentences(self, n: int, rng: random.Random) -> list[str]:
        raise NotImplementedError

    @property
    def tag(self) -> str:
        """Short identity of the haystack's content (part of every sample's id)."""
        return self.name


class NoiseHaystack(Haystack):
    name = "noise"
    UNITS = [s.strip() + "." for s in NOISE.split(".") if s.strip()]

    def sentences(self, n: int, rng: random.Random) -> list[str]:
        return [self.UNITS[i % len(self.UNITS)] for i in range(n)]


class ProceduralHaystack(Haystack):
    """Sentences like "The quiet wagon crossed the bridge near the golden harbor." from a fixed word list."""

    name = "procedural"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def sentence(self, i: int) -> str:
        r = random.Random(f"procedural-{self.seed}-{i}")
        a, b, c = (r.choice(ADJECTIVES) for _ in range(3))
        n1, n2, n3 = (r.choice(NOUNS) for _ in range(3))
        v, p = r.choice(VERBS_PAST), r.choice(PREPOSITIONS)
        form = r.randrange(4)
        if form == 0:
            s = f"the {a} {n1} {v} the {n2} {p} the {c} {n3}."
        elif form == 1:
            s = f"every {n1} {v} a {b} {n2}, and the {n3} was {c}."
        elif form == 2:
            s = f"{p} the {n1}, a {a} {n2} {v} the {b} {n3}."
        else:
            s = f"nobody {v} the {a} {n1} until the {n2} became {c}."
        return s[0].upper() + s[1:]

    def sentences(self, n: int, rng: random.Random) -> list[str]:
        start = rng.randrange(1_000_000)
        return [self.sentence(start + i) for i in range(n)]

    @property
    def tag(self) -> str:
        return f"proc{self.seed}"


class EssayHaystack(Haystack):
    """Every sentence of the `.txt` files of `directory`, in file-name order."""

    name = "essays"

    def __init__(self, directory: str | Path):
        d = Path(directory)
        if not d.is_dir():
            raise KVSqueezeError(f"haystack directory not found: {d}")
        files = sorted(d.glob("*.txt"))
        if not files:
            raise KVSqueezeError(f"no .txt files in haystack directory {d}")
        h = hashlib.sha256()
        units: list[str] = []
        for f in files:
            text = f.read_text(errors="replace")
            h.update(f.name.encode() + b"\0" + text.encode())
            text = re.sub(r"\s+", " ", text).strip()
            units.extend(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
        if len(units) < 10:
            raise KVSqueezeError(f"the .txt files in {d} hold too little text for a haystack")
        self.units = units
        self._tag = f"dir{h.hexdigest()[:8]}"

    def sentences(self, n: int, rng: random.Random) -> list[str]:
        start = rng.randrange(len(self.units))
        return [self.units[(start + i) % len(self.units)] for i in range(n)]

    @property
    def tag(self) -> str:
        return self._tag


def make_haystack(directory: str | Path | None, seed: int = 0) -> Haystack:
    """The essay haystack of `directory`, or the procedural one when no directory is given."""
    return EssayHaystack(directory) if directory else ProceduralHaystack(seed)


def insert_at_depths(sentences: list[str], needles: list[tuple[float, str]]) -> str:
    """Join `sentences`, inserting each (depth in [0, 1], needle) between sentences at that depth."""
    out = list(sentences)
    for depth, needle in sorted(needles, key=lambda x: x[0], reverse=True):
        at = round(min(max(depth, 0.0), 1.0) * len(sentences))
        out.insert(at, needle)
    return " ".join(out)
