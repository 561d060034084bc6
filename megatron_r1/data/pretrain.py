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


DEFAULT_ERROR_OFFSETS = tuple(d for d in range(-10, 11) if d)


def _corrupt(solution: str, answer: str, rng: random.Random, offsets=DEFAULT_ERROR_OFFSETS) -> tuple[str, str]:
    """A wrong final answer (the right one plus one of `offsets`), with the last step's result changed to match."""
    wrong = int(answer) + rng.choice(offsets)
    # The solution ends with "... = <answer>"; rewrite that last number only.
    new_solution = re.sub(rf"(?<![\d-]){re.escape(answer)}(\D*)$", rf"{wrong}\g<1>", solution, count=1)
    return new_solution, str(wrong)


def _guess_then_steps(sample: dict, steps: str, correct_fraction: float, reflect_fraction: float, offsets,
                      rng: random.Random) -> tuple[str, str]:
    """A quick guess at the whole expression, then, in `reflect_fraction` of the cases, "wait:" and the steps."""
    if not re.fullmatch(r"\d+([+*-]\d+)+", sample["prompt"]):
        raise ConfigError(f"pretrain_corpus: reflect_fraction needs a task whose prompt is an expression like "
                          f"43+5-2 (demo_chain), got {sample['prompt']!r}")
    answer = sample["answer"]
    guess = answer if rng.random() < correct_fraction else str(int(answer) + rng.choice(offsets))
    quick = f"{sample['prompt']}={guess}"
    if rng.random() < reflect_fraction:
        return f"{quick}, wait: {steps}", answer
    return quick, guess


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
                    plain_fraction: float = 0.0, error_offsets=DEFAULT_ERROR_OFFSETS, reflect_fraction: float = 0.0,
                    split: str = "train", **task_options) -> list[str]:
    """`num_samples` full documents `template(prompt) + " <think> steps </think> <answer> N </answer>"`.

    `task` is a built-in task whose samples carry an integer `answer` and a short `solution` (demo_arithmetic,
    arithmetic, word_problems); `task_options` (e.g. difficulty) go to its generator. No EOS is appended: the
    trainer adds its tokenizer's.

    `plain_fraction` of the documents drop the template's instructions and keep only its last turn ("User: 43+5.
    Assistant: <think> ..."), like the bare worked problems a base model's corpus is full of: a quarter of the
    tokens per problem, so a tiny model sees several times more problems per step of compute.

    A wrong answer is the right one plus one of `error_offsets` (default ±1..±10): `[-10, 10]` makes every slip a
    tens-digit slip, so the units digits stay a clean signal and the errors one systematic habit RL can unlearn.

    `reflect_fraction` > 0 gives the corpus two modes, for a task whose prompt is an expression (demo_chain):
    every reasoning opens with a quick guess at the whole expression ("43+5-2=56"), right with probability
    `correct_fraction` (else off by one of `error_offsets`). In `reflect_fraction` of the documents the writer
    then says "wait:" and works the steps out ("43+5=48, 48-2=46"), answering their (right) result; the others
    answer the guess. Long reasoning is then usually right and short reasoning often wrong, so a reward for the
    right answer alone pays for thinking longer.

    `split="test"` writes the same kind of documents about held-out problems (for a held-out loss); pre-training
    uses the default, "train", so held-out evaluation problems are never seen.
    """
    for name, value in (("correct_fraction", correct_fraction), ("broken_format_fraction", broken_format_fraction),
                        ("plain_fraction", plain_fraction), ("reflect_fraction", reflect_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"pretrain_corpus: {name} must be in [0, 1], got {value}")
    offsets = tuple(error_offsets)
    if not offsets or not all(isinstance(d, int) and not isinstance(d, bool) and d for d in offsets):
        raise ConfigError(f"pretrain_corpus: error_offsets must be a non-empty list of non-zero integers, got "
                          f"{error_offsets!r}")
    tmpl = get_template(template)
    samples = generate(task, num_samples=num_samples, seed=seed, split=split, **task_options)
    rng = random.Random(f"pretrain:{task}:{seed}")
    docs = []
    for s in samples:
        if "solution" not in s or not re.fullmatch(r"-?\d+", s.get("answer", "")):
            raise ConfigError(f"pretrain_corpus: task {task!r} samples need an integer answer and a solution")
        reasoning, answer = s["solution"].replace("\n", " "), s["answer"]
        if reflect_fraction:
            reasoning, answer = _guess_then_steps(s, reasoning, correct_fraction, reflect_fraction, offsets, rng)
        elif rng.random() >= correct_fraction:
            reasoning, answer = _corrupt(reasoning, answer, rng, offsets)
        prompt_text = tmpl.format(s["prompt"])
        if plain_fraction and rng.random() < plain_fraction:
            prompt_text = prompt_text[prompt_text.rfind("User:"):] if "User:" in prompt_text else s["prompt"]
        if rng.random() < broken_format_fraction:
            docs.append(_broken(prompt_text, reasoning, answer, rng))
        else:
            docs.append(f"{prompt_text} <think> {reasoning} </think> <answer> {answer} </answer>")
    return docs
