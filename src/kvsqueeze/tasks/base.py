"""A task sample: a context, a question and the expected answers (kvpress's columns), and how tasks are sized.

Every generated sample is sized in tokens of the model's tokenizer, as RULER does: the haystack grows (binary
search over its number of units) until the chat-formatted prompt (context + question + answer prefix) plus the
answer budget (`max_new_tokens`) fills the requested length without exceeding it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..errors import KVSqueezeError


@dataclass
class Sample:
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    max_new_tokens: int = 16
    task: str = ""
    meta: dict = field(default_factory=dict)
    sample_id: str = ""  # readable id, unique within the task (made unique by `finalize`)
    metric: str = "string_match_all"  # string_match_all | string_match_part | perplexity

    def to_dict(self) -> dict:
        return asdict(self)

    def content_hash(self) -> str:
        """A short hash of everything that changes what the model sees or how it is scored."""
        payload = json.dumps([self.context, self.question, self.answers, self.answer_prefix, self.max_new_tokens,
                              self.metric, self.meta.get("n_scored")], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    def finalize(self) -> "Sample":
        """Append the content hash to the id: a result row's key then changes whenever the sample does."""
        if "#" not in self.sample_id:
            self.sample_id = f"{self.sample_id}#{self.content_hash()}"
        return self


def fit_to_length(tokenizer, build, target_tokens: int, lo: int = 1, hi: int | None = None) -> str:
    """Largest n such that len(tokens(build(n))) <= target_tokens (binary search, as RULER sizes its haystack)."""
    count = lambda n: len(tokenizer(build(n), add_special_tokens=False).input_ids)  # noqa: E731
    return build(_largest(count, target_tokens, lo, hi))


def _largest(count: Callable[[int], int], target: int, lo: int = 1, hi: int | None = None) -> int:
    hi = hi or max(2, target // 8)
    while count(hi) <= target and hi < 10**7:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def prompt_tokens(tokenizer, sample: Sample) -> int:
    """Tokens of the chat-formatted prompt (context + question + answer prefix) plus the answer budget."""
    from ..runtime.generate import split_prompt

    ctx, q = split_prompt(tokenizer, sample.context, sample.question, sample.answer_prefix)
    return len(ctx) + len(q) + sample.max_new_tokens


def fit_sample(tokenizer, build: Callable[[int], Sample], target_tokens: int, what: str = "task") -> Sample:
    """The sample `build(n)` with the largest haystack size n whose prompt + answer fit in `target_tokens`."""
    count = lambda n: prompt_tokens(tokenizer, build(n))  # noqa: E731
    if count(1) > target_tokens:
        raise KVSqueezeError(
            f"{what}: a length of {target_tokens} tokens is too short (the smallest prompt takes {count(1)})"
        )
    return build(_largest(count, target_tokens))


def _norm(s: str) -> str:
    return str(s).lower()  # RULER compares lower-cased strings, nothing more


def string_match_all(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_all for one sample: the fraction of references found (case-insensitive) in the prediction."""
    if not answers:
        return 0.0
    p = _norm(prediction)
    return sum(_norm(a) in p for a in answers) / len(answers)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """RULER's string_match_part for one sample: 1 if any reference is found (case-insensitive) in the prediction."""
    p = _norm(prediction)
    return float(any(_norm(a) in p for a in answers))


METRICS = {"string_match_all": string_match_all, "string_match_part": string_match_part}


def score(sample: Sample, prediction: str) -> dict[str, float]:
    """Both RULER metrics of a prediction (the sample's `metric` is the primary one)."""
    return {name: fn(prediction, sample.answers) for name, fn in METRICS.items()}
