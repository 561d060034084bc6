"""Pre-training text for the demo's tiny base model: task problems solved in the R1-Zero format, imperfectly.

The base model must be weak but not hopeless so that RL has something visible to fix: only `correct_fraction`
of the documents end in the right answer (the error sits in the last reasoning step, so the reasoning stays
consistent with the wrong answer) and `broken_format_fraction` break the tag structure in one of a few ways.
Only train-split problems are used, so held-out evaluation problems are never seen in pre-training.
"""
from __future__ import annotations

import random
import re

from megatron_r1.data.tasks import generate
from megatron_r1.data.templates import get_template
from megatron_r1.errors import ConfigError


def _corrupt(solution: str, answer: str, rng: random.Random) -> tuple[str, str]:
    """A wrong final answer, with the last step's result changed to match it."""
    wrong = int(answer) + rng.choice([d for d in range(-10, 11) if d])
    # The solution ends with "... = <answer>"; rewrite that last number only.
    new_solution = re.sub(rf"(?<![\d-]){re.escape(answer)}(\D*)$", rf"{wrong}\g<1>", solution, count=1)
    return new_solution, str(wrong)


def _broken(prompt_text: str, reasoning: str, answer: str, rng: random.Random) -> str:
    """One of the format mistakes RL should train away."""
    kind = rng.randrange(4)
    if kind == 0:
        return f"{prompt_text} <think> {reasoning} <answer> {answer} </answer>"  # missing </think>
    if kind == 1:
        return f"{prompt_text} <think> {reasoning} </think> {answer}"  # untagged answer
    if kind == 2:
        return f"{prompt_text} <answer> {answer} </answer>"  # no reasoning
    return f"{prompt_text} <think> {reasoning} </think> <answer> {answer} </answer> <answer> {answer} </answer>"


def pretrain_corpus(task: str = "demo_arithmetic", num_samples: int = 10000, seed: int = 0,
                    correct_fraction: float = 0.5, broken_format_fraction: float = 0.1, template: str = "r1_zero",
                    **task_options) -> list[str]:
    """`num_samples` full documents `template(prompt) + " <think> steps </think> <answer> N </answer>"`.

    `task` is a built-in task whose samples carry an integer `answer` and a short `solution` (demo_arithmetic,
    arithmetic, word_problems); `task_options` (e.g. difficulty) go to its generator. No EOS is appended: the
    trainer adds its tokenizer's.
    """
    for name, value in (("correct_fraction", correct_fraction), ("broken_format_fraction", broken_format_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"pretrain_corpus: {name} must be in [0, 1], got {value}")
    tmpl = get_template(template)
    samples = generate(task, num_samples=num_samples, seed=seed, split="train", **task_options)
    rng = random.Random(f"pretrain:{task}:{seed}")
    docs = []
    for s in samples:
        if "solution" not in s or not re.fullmatch(r"-?\d+", s.get("answer", "")):
            raise ConfigError(f"pretrain_corpus: task {task!r} samples need an integer answer and a solution")
        reasoning, answer = s["solution"].replace("\n", " "), s["answer"]
        if rng.random() >= correct_fraction:
            reasoning, answer = _corrupt(reasoning, answer, rng)
        prompt_text = tmpl.format(s["prompt"])
        if rng.random() < broken_format_fraction:
            docs.append(_broken(prompt_text, reasoning, answer, rng))
        else:
            docs.append(f"{prompt_text} <think> {reasoning} </think> <answer> {answer} </answer>")
    return docs
