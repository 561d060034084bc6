"""Built-in tasks: seeded, verifiable answers, and train/test splits that never overlap."""
import itertools
import re

import pytest

from megatron_r1.data import TASKS, load_dataset, split_of
from megatron_r1.errors import ConfigError
from megatron_r1.rewards import get_reward


def canonical(task, sample):
    """The key each task hashes for its split (mirrors the generators)."""
    if task == "countdown":
        return f"{sorted(sample['numbers'])}->{sample['target']}"
    if task == "arithmetic":
        return sample["prompt"].removeprefix("Calculate ")
    if task == "multilingual":
        return str(sample["problem_id"])
    return sample["prompt"]


@pytest.mark.parametrize("task,options", [
    ("demo_arithmetic", {"difficulty": 1}), ("demo_arithmetic", {"difficulty": 3}), ("arithmetic", {}),
    ("countdown", {}), ("word_problems", {}), ("gsm_symbolic", {}),
])
def test_splits_never_overlap_and_follow_the_hash(task, options):
    n = 300
    train = load_dataset(f"builtin:{task}", split="train", num_samples=n, seed=1, **options)
    test_a = load_dataset(f"builtin:{task}", split="test", num_samples=n // 3, seed=1, **options)
    test_b = load_dataset(f"builtin:{task}", split="test", num_samples=n // 3, seed=7, **options)  # other seeds too
    train_keys = {canonical(task, s) for s in train}
    test_keys = {canonical(task, s) for s in itertools.chain(test_a, test_b)}
    assert train_keys.isdisjoint(test_keys)
    tf = 0.2 if task == "demo_arithmetic" else 0.1
    assert all(split_of(task, k, tf) == "train" for k in train_keys)
    assert all(split_of(task, k, tf) == "test" for k in test_keys)


def test_demo_arithmetic_split_partitions_the_whole_problem_space():
    """Difficulty 1 has a small space (a+b, a-b with a, b <= 20): enumerate it and check both splits are used."""
    space = [f"{a}{op}{b}" for a in range(21) for b in range(21) for op in "+-"]
    test = {p for p in space if split_of("demo_arithmetic", p, 0.2) == "test"}
    assert 0.15 < len(test) / len(space) < 0.25
    train = load_dataset("builtin:demo_arithmetic", num_samples=3000, seed=3)
    assert not {s["prompt"] for s in train} & test


def test_unique_draws_cover_the_test_space_without_repeats():
    space = [f"{a}{op}{b}" for a in range(21) for b in range(21) for op in "+-" if op == "+" or a >= b]
    n_test = sum(split_of("demo_arithmetic", p, 0.2) == "test" for p in space)
    held_out = load_dataset("builtin:demo_arithmetic", split="test", num_samples=n_test, unique=True)
    assert len({s["prompt"] for s in held_out}) == n_test
    with pytest.raises(ConfigError, match="too small .* with unique=True"):
        load_dataset("builtin:demo_arithmetic", split="test", num_samples=n_test + 1, unique=True)


def test_seeded_and_deterministic():
    a = load_dataset("builtin:word_problems", num_samples=20, seed=5)
    b = load_dataset("builtin:word_problems", num_samples=20, seed=5)
    c = load_dataset("builtin:word_problems", num_samples=20, seed=6)
    assert list(a) == list(b) and list(a) != list(c)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_demo_arithmetic_answers_are_right_and_prompts_short(difficulty):
    for s in load_dataset("builtin:demo_arithmetic", num_samples=200, difficulty=difficulty):
        assert re.fullmatch(r"[0-9+*-]+", s["prompt"]) and len(s["prompt"]) <= 12
        assert int(s["answer"]) == eval(s["prompt"]) >= 0  # noqa: S307 - digits and + - * only
        assert s["solution"].endswith(f"= {s['answer']}")


def test_arithmetic_and_word_problem_answers_match_their_worked_solutions():
    for s in load_dataset("builtin:arithmetic", num_samples=100, difficulty=3):
        assert int(s["answer"]) == eval(s["prompt"].removeprefix("Calculate "))  # noqa: S307
    for s in load_dataset("builtin:word_problems", num_samples=100, difficulty=2):
        assert s["solution"].endswith(f"The answer is {s['answer']}.") and int(s["answer"]) >= 0
        last_step = s["solution"].splitlines()[-2]
        assert f"= {s['answer']} " in last_step + " "


def test_countdown_answers_are_valid_expressions():
    samples = load_dataset("builtin:countdown", num_samples=100, num_numbers=3)
    fn = get_reward("countdown")
    assert fn([f"<answer>{s['answer']}</answer>" for s in samples], samples) == [1.0] * 100
    s = {"numbers": [2, 3, 4], "target": 14}
    tries = ["2+3*4", "(3+4)*2 = 14", "2*7", "2+2+3*4-2", "__import__('os')", "3*4+2.0", "14"]
    assert fn([f"<answer>{t}</answer>" for t in tries], [s] * len(tries)) == [1, 1, 0, 0, 0, 0, 0]


def test_gsm_symbolic_from_reasoning_gym_has_worked_solutions():
    for s in load_dataset("builtin:gsm_symbolic", num_samples=20, seed=2):
        assert s["prompt"] and re.fullmatch(r"-?\d+", s["answer"]) and "####" not in s["solution"]
        assert len(s["solution"].split()) > 10


def test_multilingual_languages_and_problem_level_split():
    train = load_dataset("builtin:multilingual")
    test = load_dataset("builtin:multilingual", split="test")
    assert {s["language"] for s in train} == {"en", "de", "fr", "zh", "ja"}
    assert len(train) + len(test) == 100
    assert {s["problem_id"] for s in train}.isdisjoint({s["problem_id"] for s in test})  # translations stay together
    zh = load_dataset("builtin:multilingual", languages="zh", num_samples=5, seed=1)
    assert len(zh) == 5 and all(s["language"] == "zh" and re.search(r"[\u4e00-\u9fff]", s["prompt"]) for s in zh)
    with pytest.raises(ConfigError, match="unknown language"):
        load_dataset("builtin:multilingual", languages=["xx"])


def test_cold_start_completions_are_well_formed_and_correct():
    samples = load_dataset("builtin:cold_start", num_samples=40, seed=0)
    completions = [s["completion"] for s in samples]
    assert get_reward("format")(completions, samples) == [1.0] * 40
    assert get_reward("accuracy")(completions, samples) == [1.0] * 40
    assert {s["task"] for s in samples} == {"word_problems", "gsm_symbolic"}
    assert min(len(s["solution"]) for s in samples) > 60  # readable multi-sentence reasoning


def test_too_small_problem_space_is_reported():
    with pytest.raises(ConfigError, match="problem space is too small"):
        load_dataset("builtin:countdown", num_numbers=2, max_value=2, max_target=10, num_samples=50)


def test_every_task_is_reachable_by_name():
    assert {"demo_arithmetic", "arithmetic", "countdown", "word_problems", "gsm_symbolic", "multilingual",
            "cold_start"} <= set(TASKS)
