"""A task sample: a context, a question and the expected answers (kvpress's columns)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Sample:
    context: str
    question: str
    answers: list[str]
    answer_prefix: str = ""
    max_new_tokens: int = 16
    task: str = ""
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_to_length(tokenizer, build, target_tokens: int, lo: int = 1, hi: int | None = None) -> str:
    """Largest n such that len(tokens(build(n))) <= target_tokens (binary search, as RULER sizes its haystack)."""
    count = lambda n: len(tokenizer(build(n), add_special_tokens=False).input_ids)  # noqa: E731
    hi = hi or max(2, target_tokens)
    while count(hi) <= target_tokens and hi < 10**7:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)
