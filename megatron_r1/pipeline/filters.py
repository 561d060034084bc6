"""The readability filters of R1's rejection sampling (stage 3), as pure functions of one completion.

The report keeps only correct answers and removes chain-of-thought with mixed languages, long paragraphs and code
blocks; we also remove degenerate repetition (a common failure of RL-trained policies) and malformed answers.
Each answer is attributed to the first filter in `FILTER_ORDER` that rejects it, so the per-filter counts add up
to the number removed and `megatron-r1 sample` can print what each filter removed.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron_r1.rewards.extract import extract_think
from megatron_r1.rewards.format import format_ok
# The language reward's own notion of a word, so "no words" here means what it means there.
from megatron_r1.rewards.language import _WORD_RE, language_share

# Order matters only for attribution. Structural checks come before the language one: code and loops are rarely
# "English" to a language detector, and a code block should be reported as a code block.
FILTER_ORDER = ("wrong_answer", "bad_format", "code_block", "overlong_paragraph", "repetition", "mixed_language",
                "duplicate", "per_prompt_cap")
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n")


@dataclass
class FilterThresholds:
    """The knobs the filters read (a view of SamplingOptions, so the filters do not depend on the CLI)."""

    min_language_consistency: float = 0.95
    max_paragraph_chars: int = 2000
    reject_code_blocks: bool = True
    repetition_ngram: int = 4
    max_repeated_ngram_fraction: float = 0.3
    require_format: bool = True
    think_only: bool = False  # the template opens <think> itself (r1_chat): the answer follows untagged


@dataclass
class Scores:
    """What the filters measured on one completion (written into each kept row's provenance)."""

    accuracy: float
    format: float
    language_consistency: float
    max_paragraph_chars: int
    has_code_block: bool
    repeated_ngram_fraction: float

    def as_dict(self) -> dict:
        return {**asdict(self), "repeated_ngram_fraction": round(self.repeated_ngram_fraction, 4)}


def reasoning_language_consistency(completion: str, language: str) -> float:
    """Share of the reasoning's words in `language`. Reasoning without any words (only formulas and numbers)
    cannot be mixed-language, so it scores 1.0 — unlike the RL reward, which gives no credit for it."""
    think = extract_think(completion)
    if not _WORD_RE.findall(think):
        return 1.0
    return language_share(think, language)


def longest_paragraph(completion: str) -> int:
    """Characters in the longest blank-line-separated paragraph (characters, not words: CJK has no spaces)."""
    return max((len(p.strip()) for p in _PARAGRAPH_SPLIT.split(completion)), default=0)


def has_code_block(completion: str) -> bool:
    """A code fence anywhere (closed or not: an unclosed fence is still code in the CoT)."""
    return "```" in completion


def repeated_ngram_fraction(completion: str, n: int = 4, min_ngrams: int = 8) -> float:
    """1 − distinct/total word n-grams: 0 for text that never repeats a phrase, → 1 for a loop. Short texts
    (fewer than `min_ngrams` n-grams) score 0: a few repeated words there are normal arithmetic, not a loop."""
    words = completion.split()
    total = len(words) - n + 1
    if total < min_ngrams:
        return 0.0
    grams = {tuple(words[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


def measure(completion: str, accuracy: float, language: str, t: FilterThresholds) -> Scores:
    return Scores(
        accuracy=float(accuracy),
        format=float(format_ok(completion, t.think_only)),
        language_consistency=reasoning_language_consistency(completion, language),
        max_paragraph_chars=longest_paragraph(completion),
        has_code_block=has_code_block(completion),
        repeated_ngram_fraction=repeated_ngram_fraction(completion, t.repetition_ngram),
    )


def first_failure(s: Scores, t: FilterThresholds) -> Optional[str]:
    """The name of the first content filter (see FILTER_ORDER) that rejects an answer with scores `s`, or None.
    `duplicate` and `per_prompt_cap` depend on the other answers and are applied by `select_answers`."""
    if s.accuracy < 1.0:
        return "wrong_answer"
    if t.require_format and s.format < 1.0:
        return "bad_format"
    if t.reject_code_blocks and s.has_code_block:
        return "code_block"
    if s.max_paragraph_chars > t.max_paragraph_chars:
        return "overlong_paragraph"
    if s.repeated_ngram_fraction > t.max_repeated_ngram_fraction:
        return "repetition"
    if s.language_consistency < t.min_language_consistency:
        return "mixed_language"
    return None


@dataclass
class FilterStats:
    """Answers drawn, kept, and removed per filter (each removed answer counted once, by the first filter)."""

    drawn: int = 0
    kept: int = 0
    removed: dict = field(default_factory=lambda: {name: 0 for name in FILTER_ORDER})

    def add(self, other: "FilterStats") -> None:
        self.drawn += other.drawn
        self.kept += other.kept
        for k, v in other.removed.items():
            self.removed[k] = self.removed.get(k, 0) + v

    def table(self) -> str:
        lines = [f"{'filter':<20}{'removed':>9}{'share':>8}", "-" * 37]
        for name in FILTER_ORDER:
            n = self.removed.get(name, 0)
            lines.append(f"{name:<20}{n:>9}{n / max(1, self.drawn):>8.1%}")
        lines.append("-" * 37)
        lines.append(f"{'kept':<20}{self.kept:>9}{self.kept / max(1, self.drawn):>8.1%}  of {self.drawn} drawn")
        return "\n".join(lines)


def select_answers(completions: list[str], scores: list[Scores], t: FilterThresholds,
                   max_per_prompt: Optional[int]) -> tuple[list[int], FilterStats]:
    """Indices of one prompt's answers that survive every filter, and the counts of what each filter removed.

    Identical answers to the same prompt are kept once (they add no information and would overweight the prompt);
    `max_per_prompt` caps how many distinct correct answers one prompt contributes."""
    stats = FilterStats(drawn=len(completions))
    kept: list[int] = []
    seen: set[str] = set()
    for i, (c, s) in enumerate(zip(completions, scores, strict=True)):
        reason = first_failure(s, t)
        if reason is None and c.strip() in seen:
            reason = "duplicate"
        if reason is None and max_per_prompt is not None and len(kept) >= max_per_prompt:
            reason = "per_prompt_cap"
        if reason is not None:
            stats.removed[reason] += 1
            continue
        seen.add(c.strip())
        kept.append(i)
    stats.kept = len(kept)
    return kept, stats
