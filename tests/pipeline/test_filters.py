"""Rejection-sampling filters on hand-made answers: each bad answer is removed by the filter named for its flaw."""
import pytest

from megatron_r1.pipeline.filters import (
    FILTER_ORDER,
    FilterThresholds,
    first_failure,
    has_code_block,
    longest_paragraph,
    measure,
    reasoning_language_consistency,
    repeated_ngram_fraction,
    select_answers,
)

GOOD = ("<think> First add the apples: 3 plus 4 is 7. Then the total is 7, so the answer is 7. </think> "
        "<answer> 7 </answer>")
MIXED = ("<think> First add the apples: 3 plus 4 is 7. 然后我们把结果写下来，所以答案是七。 </think> "
         "<answer> 7 </answer>")
CODE = "<think> Let me compute it.\n```python\nprint(3 + 4)\n```\nIt prints 7. </think> <answer> 7 </answer>"
LONG = "<think> " + "We add the numbers carefully and check each digit again. " * 12 + "</think> <answer> 7 </answer>"
LOOP = "<think> " + "wait let me check again " * 12 + "</think> <answer> 7 </answer>"
WRONG = "<think> 3 plus 4 is 8. </think> <answer> 8 </answer>"
UNTAGGED = "3 plus 4 is 7, the answer is 7"

T = FilterThresholds(min_language_consistency=0.9, max_paragraph_chars=400, max_repeated_ngram_fraction=0.3)


def verdict(text, correct=True, language="en", t=T):
    return first_failure(measure(text, 1.0 if correct else 0.0, language, t), t)


@pytest.mark.parametrize("text,correct,expected", [
    (GOOD, True, None),
    (WRONG, False, "wrong_answer"),
    (UNTAGGED, True, "bad_format"),
    (MIXED, True, "mixed_language"),
    (LONG, True, "overlong_paragraph"),
    (CODE, True, "code_block"),
    (LOOP, True, "repetition"),
])
def test_each_flaw_is_caught_by_its_filter(text, correct, expected):
    assert verdict(text, correct) == expected


def test_measurements():
    assert reasoning_language_consistency(GOOD, "en") == pytest.approx(1.0)
    mixed = reasoning_language_consistency(MIXED, "en")
    assert 0.1 < mixed < 0.9  # a good share of the "words" (one per CJK character) are Chinese
    # The same mixed CoT is not "consistent" for Chinese either: the filter wants one language, not the majority.
    assert reasoning_language_consistency(MIXED, "zh") < 0.9
    # Numbers and symbols only: nothing to be mixed, so it passes (the RL reward would give 0 here).
    assert reasoning_language_consistency("<think> 3 + 4 = 7 </think> <answer> 7 </answer>", "en") == 1.0
    assert has_code_block(CODE) and not has_code_block(GOOD)
    assert has_code_block("<think> ```python\nx = 1 </think>")  # unclosed fence is still code
    assert longest_paragraph("short\n\n" + "x" * 50 + "\n\nend") == 50
    assert repeated_ngram_fraction(GOOD) < 0.1
    assert repeated_ngram_fraction(LOOP) > 0.7
    assert repeated_ngram_fraction("a a a a a") == 0.0  # too short to call a loop


def test_thresholds_are_honoured():
    loose = FilterThresholds(min_language_consistency=0.0, max_paragraph_chars=10_000, reject_code_blocks=False,
                             max_repeated_ngram_fraction=1.0, require_format=False)
    for text in (MIXED, LONG, CODE, LOOP, UNTAGGED):
        assert verdict(text, t=loose) is None, text
    assert verdict(WRONG, correct=False, t=loose) == "wrong_answer"  # correctness is never optional


def test_target_language_from_the_sample():
    zh = "<think> 三加四等于七，所以答案是七。 </think> <answer> 7 </answer>"
    assert verdict(zh, language="zh") is None
    assert verdict(zh, language="en") == "mixed_language"


def test_select_answers_counts_every_removal_once():
    texts = [GOOD, GOOD, WRONG, MIXED, CODE, LONG, LOOP, GOOD.replace("apples", "pears"), UNTAGGED]
    correct = [True, True, False, True, True, True, True, True, True]
    scores = [measure(x, float(c), "en", T) for x, c in zip(texts, correct)]
    kept, stats = select_answers(texts, scores, T, max_per_prompt=None)
    assert kept == [0, 7]  # the second GOOD is a duplicate
    assert stats.drawn == 9 and stats.kept == 2
    assert stats.removed == {"wrong_answer": 1, "bad_format": 1, "mixed_language": 1, "overlong_paragraph": 1,
                             "code_block": 1, "repetition": 1, "duplicate": 1, "per_prompt_cap": 0}
    assert sum(stats.removed.values()) + stats.kept == stats.drawn
    kept, stats = select_answers(texts, scores, T, max_per_prompt=1)
    assert kept == [0] and stats.removed["per_prompt_cap"] == 1
    table = stats.table()
    for name in FILTER_ORDER:
        assert name in table
