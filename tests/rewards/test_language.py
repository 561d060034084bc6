"""The `language_consistency` reward on hand-made reasoning: pure, mixed, CJK without spaces, empty."""
import pytest

from megatron_r1.errors import ConfigError
from megatron_r1.rewards import get_reward
from megatron_r1.rewards.language import language_share


def wrap(cot: str) -> str:
    return f"<think>{cot}</think> <answer>5</answer>"


def test_pure_languages_score_one():
    fn = get_reward("language_consistency")
    completions = [
        wrap("First we add the two numbers together, then we divide the result by two."),
        wrap("Zuerst addieren wir die beiden Zahlen und teilen das Ergebnis dann durch zwei."),
        wrap("我们先把两个数相加，然后把结果除以二。"),
        wrap("まず二つの数を足して、その結果を二で割ります。"),
    ]
    samples = [{"language": x} for x in ("en", "de", "zh", "ja")]
    assert fn(completions, samples) == [1.0, 1.0, 1.0, 1.0]


def test_wrong_language_scores_zero():
    fn = get_reward("language_consistency", language="zh")  # option overrides the sample
    assert fn([wrap("First we add the two numbers together, then divide by two.")], [{"language": "en"}]) == [0.0]


def test_mixed_chinese_english_counts_characters_as_words():
    # 9 Han characters (each a word: no spaces in Chinese) + 5 English words.
    cot = "我们先把两个数相加 then divide the result carefully"
    assert language_share(cot, "zh") == pytest.approx(9 / 14)
    assert language_share(cot, "en") == pytest.approx(5 / 14)


def test_mixed_english_german_gives_a_fraction():
    cot = ("First we add all of the numbers that are given in the question. "
           "Dann teilen wir das Ergebnis durch die Anzahl der Zahlen und schreiben es auf.")
    share = language_share(cot, "en")
    assert 0.3 < share < 0.7


def test_numbers_and_symbols_are_neutral_and_empty_cot_scores_zero():
    fn = get_reward("language_consistency")
    assert language_share("3 + 4 = 7, so the total is 7 * 2 = 14", "en") == 1.0
    assert language_share("3 + 4 = 7, then 7 * 2 = 14", "en") == 1.0  # a lone short word between formulas
    assert language_share("3 + 4 = 7, Zahlen 7 * 2 = 14", "en") == 0.0
    assert fn([wrap(""), "<answer>5</answer>", wrap("  "), wrap("= 42 =")], [{"language": "en"}] * 4) == [0.0] * 4


def test_kana_is_japanese_not_chinese():
    assert language_share("まず足します", "zh") == pytest.approx(1 / 6)  # only 足 is Han
    assert language_share("まず足します", "ja") == 1.0


def test_unknown_language_is_a_config_error():
    with pytest.raises(ConfigError, match="unsupported language 'xx'"):
        language_share("hello", "xx")
    with pytest.raises(ConfigError, match="unsupported language 'english'"):
        get_reward("language_consistency", language="english")  # at config time, not mid-run
