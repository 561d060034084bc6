"""Demo pre-training corpus: template, short documents, the requested share of right answers and broken formats."""
import re

import pytest

from megatron_r1.data import get_template, load_dataset, load_tokenizer, pretrain_corpus
from megatron_r1.errors import ConfigError
from megatron_r1.rewards import get_reward

PREFIX = get_template("r1_zero").format("")[: -len(". Assistant:")]


def parse(doc):
    prompt = re.search(r"User: (.*?)\. Assistant:", doc).group(1)
    return prompt, doc[doc.index("Assistant:") + len("Assistant:"):]


def test_documents_follow_the_template_and_fractions():
    docs = pretrain_corpus("demo_arithmetic", num_samples=2000, seed=0, correct_fraction=0.4,
                           broken_format_fraction=0.2, difficulty=2)
    assert len(docs) == 2000 and all(d.startswith(PREFIX) for d in docs)
    prompts, completions = zip(*map(parse, docs))
    samples = [{"answer": str(eval(p))} for p in prompts]  # noqa: S307 - generated digits and + - *
    fmt = get_reward("format")(list(completions), samples)
    acc = get_reward("accuracy")(list(completions), samples)
    assert 0.16 < 1 - sum(fmt) / len(docs) < 0.24  # broken format
    well_formed = [a for a, f in zip(acc, fmt) if f]
    assert 0.35 < sum(well_formed) / len(well_formed) < 0.45  # right answers
    wrong = [c for c, a, f in zip(completions, acc, fmt) if not a and f]
    # A wrong answer comes with a consistent, wrong last step (not a random number after right reasoning).
    assert all(re.search(r"= (-?\d+) </think> <answer> \1 </answer>", c) for c in wrong)


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_documents_fit_the_demo_context(difficulty):
    tok = load_tokenizer("builtin:demo")
    docs = pretrain_corpus(num_samples=500, seed=1, difficulty=difficulty)
    assert max(len(tok.encode(d)) for d in docs) < 160


def test_only_train_problems_are_used():
    test_prompts = {s["prompt"] for s in load_dataset("builtin:demo_arithmetic", split="test", num_samples=80)}
    docs = pretrain_corpus(num_samples=3000, seed=2, correct_fraction=1.0, broken_format_fraction=0.0)
    assert not {parse(d)[0] for d in docs} & test_prompts


def test_extremes_and_validation():
    docs = pretrain_corpus(num_samples=200, correct_fraction=1.0, broken_format_fraction=0.0)
    prompts, completions = zip(*map(parse, docs))
    samples = [{"answer": str(eval(p))} for p in prompts]  # noqa: S307
    assert get_reward("accuracy")(list(completions), samples) == [1.0] * 200
    assert get_reward("format")(list(completions), samples) == [1.0] * 200
    with pytest.raises(ConfigError, match="correct_fraction"):
        pretrain_corpus(num_samples=1, correct_fraction=1.5)
    with pytest.raises(ConfigError, match="integer answer and a solution"):
        pretrain_corpus("countdown", num_samples=1)


def test_plain_documents_keep_only_the_last_turn():
    docs = pretrain_corpus(num_samples=2000, seed=3, difficulty=0, plain_fraction=0.75, broken_format_fraction=0.0)
    plain = [d for d in docs if d.startswith("User: ")]
    assert 0.70 < len(plain) / len(docs) < 0.80
    assert all(d.startswith(PREFIX) for d in docs if not d.startswith("User: "))
    assert all(re.fullmatch(r"User: \d+[+-]\d\. Assistant: <think> .* </think> <answer> \d+ </answer>", d)
               for d in plain)
    # The option off leaves the corpus exactly as before (same RNG stream).
    assert pretrain_corpus(num_samples=50, seed=3) == pretrain_corpus(num_samples=50, seed=3, plain_fraction=0.0)


def test_error_offsets_choose_the_slips():
    docs = pretrain_corpus(num_samples=1500, seed=4, difficulty=0, correct_fraction=0.4, broken_format_fraction=0.0,
                           error_offsets=[-10, 10])
    prompts, completions = zip(*map(parse, docs))
    answers = [int(re.search(r"<answer> (-?\d+) </answer>", c).group(1)) for c in completions]
    diffs = [a - eval(p) for p, a in zip(prompts, answers)]  # noqa: S307
    assert set(diffs) == {-10, 0, 10}
    assert 0.35 < diffs.count(0) / len(diffs) < 0.45
    for bad in ([], [0], [1.5], "10"):
        with pytest.raises(ConfigError, match="error_offsets"):
            pretrain_corpus(num_samples=1, error_offsets=bad)
