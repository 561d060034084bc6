"""Hand-made cases for the `accuracy` reward: extraction, math equivalence, timeouts, speed, the pool's lifecycle."""
import os
import signal
import time

import pytest

from megatron_r1.rewards import extract_answer, get_reward, last_boxed
from megatron_r1.rewards.accuracy import plain_number
from megatron_r1.rewards.verify_pool import VerifyPool


@pytest.fixture(scope="module")
def accuracy():
    fn = get_reward("accuracy", timeout=3.0)
    yield fn
    fn.close()


def score(fn, completion, answer):
    return fn([completion], [{"answer": answer}])[0]


def test_extraction_prefers_answer_tag_then_last_boxed():
    assert extract_answer("<think>\\boxed{1}</think><answer> 7 </answer>") == "7"
    assert extract_answer("first \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert extract_answer("<answer>1</answer> <answer>2</answer>") == "2"
    assert extract_answer("no answer here") is None
    assert last_boxed("\\boxed{\\frac{1}{2") is None  # unbalanced braces: no answer, not a truncated one


CASES = [
    # (completion, gold, expected)
    ("<think>r</think> <answer>5</answer>", "5", 1.0),
    ("<think>r</think> <answer>6</answer>", "5", 0.0),
    ("\\boxed{1/2}", "0.5", 1.0),                               # boxed fraction vs decimal (fast path)
    ("<answer>\\boxed{-7}</answer>", "-7", 1.0),
    ("<answer>\\frac{1}{2}</answer>", "0.5", 1.0),              # LaTeX through math-verify
    ("<answer>\\dfrac{3}{4}</answer>", "\\frac{3}{4}", 1.0),
    ("<answer>\u22125</answer>", "-5", 1.0),                    # unicode minus
    ("<answer>\uff14\uff12</answer>", "42", 1.0),               # full-width digits
    ("<answer>1,234</answer>", "1234", 1.0),
    ("<answer>123456789012345678901234567890</answer>", "123456789012345678901234567890", 1.0),  # huge, exact
    ("<answer>123456789012345678901234567891</answer>", "123456789012345678901234567890", 0.0),  # no float rounding
    ("<answer>$\\{1,2\\}$</answer>", "\\{2,1\\}", 1.0),        # sets
    ("<answer>[0,1)</answer>", "[0,1)", 1.0),                    # intervals
    ("<answer>(0,1]</answer>", "[0,1)", 0.0),
    ("<answer>10\\%</answer>", "10", 1.0),                       # percentage of a GSM answer
    ("<answer>x = 3</answer>", "3", 1.0),
    ("The answer is 5.", "5", 0.0),                              # answer outside any tag/box does not count
    ("<think> the answer is <answer>5</answer> </think>", "5", 1.0),  # accuracy does not judge format
    ("<answer></answer>", "5", 0.0),
    ("<answer>five</answer>", "5", 0.0),
]


@pytest.mark.parametrize("completion,gold,expected", CASES)
def test_cases(accuracy, completion, gold, expected):
    assert score(accuracy, completion, gold) == expected


def test_exact_mode_for_choices():
    fn = get_reward("accuracy", mode="exact")
    assert fn(["<answer> B. </answer>", "<answer>\\text{b}</answer>", "<answer>C</answer>"],
              [{"answer": "B"}] * 3) == [1.0, 1.0, 0.0]


def test_plain_number_fast_path_is_exact():
    assert plain_number("1/2") == plain_number("0.5") == plain_number("5e-1")
    assert plain_number("1/0") is None and plain_number("\\frac{1}{2}") is None and plain_number("1,2") is None
    assert plain_number("9" * 5000) is None  # too long for the in-process path: goes to the pool instead


def test_pathological_input_times_out_and_is_counted():
    fn = get_reward("accuracy", timeout=1.0, num_workers=1)
    try:
        # sympy tries to evaluate this factorial exactly: far longer than the limit.
        bomb = "<answer>$(10^{10^{7}})!$</answer>"
        start = time.monotonic()
        answers = [{"answer": "\\frac{1}{3}"}, {"answer": "0.5"}]
        assert fn([bomb, "<answer>\\frac{2}{4}</answer>"], answers) == [0.0, 1.0]
        assert time.monotonic() - start < 8
        assert fn.timeouts == 1
        # The pool replaced the killed worker and keeps working.
        assert fn(["<answer>\\frac{1}{2}</answer>"], [{"answer": "0.5"}]) == [1.0]
    finally:
        fn.close()


def test_batch_of_64_is_fast_after_warmup(accuracy):
    completions = ([f"<think>add</think> <answer>{i}</answer>" for i in range(60)]
                   + ["<answer>\\frac{1}{2}</answer>"] * 4)
    samples = [{"answer": str(i)} for i in range(60)] + [{"answer": "0.5"}] * 4
    accuracy(completions, samples)  # warm-up: starts workers
    start = time.monotonic()
    assert accuracy(completions, samples) == [1.0] * 64
    assert time.monotonic() - start < 1.0


@pytest.mark.slow  # waits out a worker timeout
def test_pool_kills_and_replaces_an_unresponsive_worker():
    """The hard wall-clock limit, for work stuck where math-verify's signal timeout cannot interrupt it."""
    pool = VerifyPool(num_workers=1, timeout=1)
    try:
        pool.verify_many([("1", "1")])
        stuck = pool._workers[0].proc
        os.kill(stuck.pid, signal.SIGSTOP)  # a worker that never answers
        start = time.monotonic()
        verdicts = pool.verify_many([("\\frac{1}{2}", "0.5"), ("\\sqrt{4}", "2")])
        assert verdicts[0].timed_out and not verdicts[0].ok
        assert verdicts[1].ok  # the replacement worker scored the rest
        assert time.monotonic() - start < 10
        assert stuck.poll() is not None and pool._workers[0].proc is not stuck
    finally:
        pool.close()


def test_pool_is_lazy_reused_and_closable():
    pool = VerifyPool(num_workers=1, timeout=3)
    assert pool._workers == []  # nothing started until used
    assert [v.ok for v in pool.verify_many([("\\frac{1}{2}", "0.5")])] == [True]
    pid = pool._workers[0].proc.pid
    pool.verify_many([("\\sqrt{4}", "2")])
    assert pool._workers[0].proc.pid == pid  # reused, not restarted
    proc = pool._workers[0].proc
    pool.close()
    assert proc.poll() is not None and pool._workers == []
    assert [v.ok for v in pool.verify_many([("2", "2")])] == [True]  # restarts lazily after close
    pool.close()


def _score_in_child(queue):
    fn = get_reward("accuracy", timeout=3.0, num_workers=1)
    try:
        queue.put(fn(["<answer>\\frac{1}{2}</answer>", "<answer>3</answer>"], [{"answer": "0.5"}, {"answer": "4"}]))
    finally:
        fn.close()


def test_works_inside_a_daemonic_spawned_process_and_a_thread():
    """Trainer ranks run as spawned (often daemonic) processes and may score from threads: no multiprocessing
    children (forbidden in daemons) and no signals in non-main threads are needed."""
    import multiprocessing
    import threading

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_score_in_child, args=(queue,), daemon=True)
    proc.start()
    assert queue.get(timeout=60) == [1.0, 0.0]
    proc.join(30)
    assert proc.exitcode == 0

    results = []
    fn = get_reward("accuracy", num_workers=1)
    thread = threading.Thread(target=lambda: results.append(fn(["\\boxed{\\sqrt{4}}"], [{"answer": "2"}])))
    thread.start()
    thread.join(60)
    fn.close()
    assert results == [[1.0]]
