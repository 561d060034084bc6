"""Hand-made cases for the `format` reward, adversarial ones included."""
import pytest

from megatron_r1.rewards import get_reward

GOOD = [
    "<think> 2 plus 3 is 5 </think> <answer> 5 </answer>",
    "<think>x</think><answer>y</answer>",
    "\n  <think>\nmulti\nline\n</think>\n\n<answer>\n42\n</answer>\n",
]
BAD = {
    "answer before think": "<answer> 5 </answer> <think> because </think>",
    "close before open": "</think> r <think> <answer> 5 </answer>",
    "nested think": "<think> a <think> b </think> c </think> <answer> 5 </answer>",
    "repeated answer": "<think> r </think> <answer> 5 </answer> <answer> 6 </answer>",
    "answer inside think": "<think> r <answer> 5 </answer> </think>",
    "text outside tags": "<think> r </think> so the answer is <answer> 5 </answer>",
    "trailing text": "<think> r </think> <answer> 5 </answer> done!",
    "leading text": "Sure! <think> r </think> <answer> 5 </answer>",
    "empty think": "<think>   </think> <answer> 5 </answer>",
    "empty answer": "<think> r </think> <answer>\n</answer>",
    "no answer tag": "<think> r </think> 5",
    "unclosed answer": "<think> r </think> <answer> 5",
    "empty string": "",
    "boxed only": "The answer is \\boxed{5}",
}


@pytest.mark.parametrize("completion", GOOD)
def test_well_formed_scores_one(completion):
    assert get_reward("format")([completion], [{}]) == [1.0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_scores_zero(case):
    assert get_reward("format")([BAD[case]], [{}]) == [0.0], case


def test_think_only_chat_style():
    fn = get_reward("format", think_only=True)
    ok = ["reasoning here </think> The answer is 5.", "<think> r </think>\n5"]
    bad = ["no closing tag, answer 5", "r </think>   ", "</think> 5", "r </think> <answer>5</answer>",
           "a </think> b </think> c", "<think><think> r </think> 5"]
    assert fn(ok, [{}] * len(ok)) == [1.0, 1.0]
    assert fn(bad, [{}] * len(bad)) == [0.0] * len(bad)
