"""The `code` reward: extraction of the last Python block, test layouts, partial credit, hostile programs."""
import pytest

from megatron_r1.rewards import get_reward, last_code_block
from megatron_r1.rewards.code import normalize_tests

ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
IO_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"},
            {"input": "0 0", "output": "0  \n\n"}]


@pytest.fixture(scope="module")
def code():
    return get_reward("code", wall_seconds=5.0, cpu_seconds=3, max_parallel=2)


def test_last_block_wins_and_other_languages_are_ignored():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n```bash\nrm -rf /\n```"
    assert last_code_block(text) == "print(2)\n"
    assert last_code_block("no code") is None


def test_stdin_stdout_tests(code):
    wrong = "```python\na, b = map(int, input().split())\nprint(a * b)\n```"  # passes only 0 0
    assert code([ADD, wrong, "no code at all"], [{"tests": IO_TESTS}] * 3) == [1.0, pytest.approx(1 / 3), 0.0]


def test_assert_snippets_and_apps_layout(code):
    fn = "```python\ndef add(a, b):\n    return a + b\n```"
    samples = [{"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]},
               {"tests": {"inputs": ["1 2", "3 4"], "outputs": ["3", "7"]}}]
    assert code([fn, ADD], samples) == [0.5, 1.0]


@pytest.mark.slow  # runs bombs to their limits
def test_hostile_program_scores_zero_and_run_continues(code):
    loop = "```python\nwhile True:\n    pass\n```"
    net = "```python\nimport urllib.request\nprint(urllib.request.urlopen('http://example.com').read()[:10])\n```"
    samples = [{"tests": [{"input": "", "output": "x"}]}] * 2
    assert code([loop, net], samples) == [0.0, 0.0]


def test_bad_tests_field_is_reported():
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        normalize_tests({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match=r"tests\[1\]"):
        normalize_tests(["assert True", 42])
