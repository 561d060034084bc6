"""The demo's task (`demo_chain`) and its two-mode pre-training corpus: a quick guess, or "wait:" and the steps."""
import re

import pytest

from megatron_r1.data import load_dataset, load_tokenizer, pretrain_corpus, split_of
from megatron_r1.errors import ConfigError
from megatron_r1.rewards import get_reward


def test_answers_steps_and_no_carry():
    for n in (2, 3, 4):
        for s in load_dataset("builtin:demo_chain", num_samples=300, seed=1, num_terms=n):
            assert re.fullmatch(r"[1-9]\d" + r"[+-][1-9]" * (n - 1), s["prompt"])
            assert int(s["answer"]) == eval(s["prompt"])  # noqa: S307 - generated digits and + -
            steps = s["solution"].split(", ")
            assert len(steps) == n - 1
            value = int(s["prompt"][:2])
            for step, (op, d) in zip(steps, re.findall(r"([+-])(\d)", s["prompt"])):
                new = value + int(d) if op == "+" else value - int(d)
                assert step == f"{value}{op}{d}={new}"
                assert new // 10 == value // 10  # no carry or borrow: the tens digit never changes
                value = new
            assert str(value) == s["answer"]


def test_splits_are_disjoint_and_unique_draws_do_not_repeat():
    train = load_dataset("builtin:demo_chain", num_samples=2000, seed=3)
    test = load_dataset("builtin:demo_chain", split="test", num_samples=300, seed=3, unique=True)
    assert len({s["prompt"] for s in test}) == 300
    assert not {s["prompt"] for s in train} & {s["prompt"] for s in test}
    assert all(split_of("demo_chain", s["prompt"], 0.2) == "test" for s in test)
    with pytest.raises(ConfigError, match="num_terms"):
        load_dataset("builtin:demo_chain", num_samples=1, num_terms=1)


def parse(doc):
    prompt = re.search(r"User: (.*?)\. Assistant:", doc).group(1)
    return prompt, doc[doc.index("Assistant:") + len("Assistant:"):]


def test_two_mode_corpus_long_reasoning_pays():
    docs = pretrain_corpus("demo_chain", num_samples=3000, seed=5, correct_fraction=0.3, reflect_fraction=0.25,
                           broken_format_fraction=0.0, plain_fraction=0.5, error_offsets=[-10, 10])
    prompts, completions = zip(*map(parse, docs))
    samples = [{"answer": str(eval(p))} for p in prompts]  # noqa: S307
    acc = get_reward("accuracy")(list(completions), samples)
    long = [", wait: " in c for c in completions]
    assert 0.22 < sum(long) / len(docs) < 0.28
    # Long documents: guess, "wait:", the steps, the steps' (right) result. Short ones answer their guess.
    for p, c, is_long, a in zip(prompts, completions, long, acc):
        guess = int(re.match(rf" <think> {re.escape(p)}=(-?\d+)", c).group(1))
        assert guess - eval(p) in (-10, 0, 10)  # noqa: S307
        if is_long:
            assert a == 1.0 and re.fullmatch(rf" <think> {re.escape(p)}=-?\d+, wait: .*={eval(p)} </think> "  # noqa: S307
                                             rf"<answer> {eval(p)} </answer>", c)  # noqa: S307
        else:
            assert c == f" <think> {p}={guess} </think> <answer> {guess} </answer>"
    short_acc = [a for a, is_long in zip(acc, long) if not is_long]
    assert 0.26 < sum(short_acc) / len(short_acc) < 0.34
    tok = load_tokenizer("builtin:demo")
    lengths = {mode: [len(tok.encode(c)) for c, is_long in zip(completions, long) if is_long == mode]
               for mode in (True, False)}
    assert min(lengths[True]) > 2 * max(lengths[False]) - 10  # thinking longer is ~2x the tokens


def test_reflect_fraction_zero_keeps_the_old_corpus_and_validation():
    assert (pretrain_corpus("demo_arithmetic", num_samples=50, seed=3)
            == pretrain_corpus("demo_arithmetic", num_samples=50, seed=3, reflect_fraction=0.0))
    with pytest.raises(ConfigError, match="reflect_fraction"):
        pretrain_corpus("demo_chain", num_samples=1, reflect_fraction=1.5)
    with pytest.raises(ConfigError, match="expression"):
        pretrain_corpus("word_problems", num_samples=1, reflect_fraction=0.5)


def test_held_out_documents_use_test_problems_only():
    test = {s["prompt"] for s in load_dataset("builtin:demo_chain", split="test", num_samples=400, seed=9)}
    docs = pretrain_corpus("demo_chain", num_samples=400, seed=9, reflect_fraction=0.5, split="test")
    assert {parse(d)[0] for d in docs} == test
    train_docs = pretrain_corpus("demo_chain", num_samples=2000, seed=9, reflect_fraction=0.5)
    assert not {parse(d)[0] for d in train_docs} & test
