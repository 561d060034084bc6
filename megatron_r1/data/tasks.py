"""Built-in generated tasks: offline, seeded, each sample with its verifiable answer; train/test never overlap.

Every generator draws candidate problems from an RNG seeded by (task, seed, split) and keeps only those that
`split_of` assigns to the requested split. The assignment hashes the canonical problem (not the seed), so no
problem can be in both splits. `builtin:<task>` in `load_dataset` dispatches here.
"""
from __future__ import annotations

import inspect
import json
import random
import re
from pathlib import Path
from typing import Callable

from megatron_r1.data.splits import check_split, split_of
from megatron_r1.errors import ConfigError

ASSETS = Path(__file__).with_name("assets")
TASKS: dict[str, Callable[..., list[dict]]] = {}


def register_task(name: str):
    """Register a generator `fn(num_samples, seed, split, **options) -> list[dict]` as `builtin:<name>`."""

    def wrap(fn):
        TASKS[name] = fn
        return fn

    return wrap


def _draw(task: str, split: str, num_samples: int, seed: int, test_fraction: float,
          make: Callable[[random.Random], tuple[str, dict]], unique: bool = False) -> list[dict]:
    """Draw `num_samples` problems of `split`; `make(rng)` returns (canonical key, sample).

    `unique=True` never repeats a problem (what an evaluation set wants); small spaces then run out sooner.
    """
    check_split(split)
    if num_samples < 0:
        raise ConfigError(f"builtin:{task}: num_samples must be >= 0, got {num_samples}")
    rng = random.Random(f"{task}:{seed}:{split}")
    out: list[dict] = []
    seen: set[str] = set()
    tries, max_tries = 0, 200 * num_samples + 1000
    while len(out) < num_samples:
        tries += 1
        if tries > max_tries:
            raise ConfigError(f"builtin:{task}: could only draw {len(out)} of {num_samples} {split} samples; the "
                              f"problem space is too small for this difficulty and test_fraction={test_fraction}"
                              + (" with unique=True" if unique else ""))
        key, sample = make(rng)
        if unique and key in seen:
            continue
        seen.add(key)
        if split_of(task, key, test_fraction) == split:
            sample.setdefault("id", f"{task}-{split}-{seed}-{len(out)}")
            sample["task"] = task
            out.append(sample)
    return out


# ---------------------------------------------------------------- arithmetic expressions (+, -, * with precedence)

def _expression(rng: random.Random, n_terms: int, max_value: int, ops: str, max_factor: int) -> list:
    """A random expression as alternating numbers and operators; factors of '*' stay small to keep answers short."""
    tokens: list = [rng.randint(0, max_value)]
    for _ in range(n_terms - 1):
        op = rng.choice(ops)
        if op == "*":
            tokens[-1] = tokens[-1] if tokens[-1] <= max_factor else rng.randint(0, max_factor)
            tokens += [op, rng.randint(0, max_factor)]
        else:
            tokens += [op, rng.randint(0, max_value)]
    return tokens


def _evaluate_steps(tokens: list) -> tuple[int, list[str]]:
    """Value of the expression and the steps a person writes: products first, then left to right."""
    tokens = list(tokens)
    steps = []
    while "*" in tokens:
        i = tokens.index("*")
        value = tokens[i - 1] * tokens[i + 1]
        steps.append(f"{tokens[i - 1]} * {tokens[i + 1]} = {value}")
        tokens[i - 1:i + 2] = [value]
    value = tokens[0]
    for op, b in zip(tokens[1::2], tokens[2::2]):
        new = value + b if op == "+" else value - b
        steps.append(f"{value} {op} {b} = {new}")
        value = new
    return value, steps


_DEMO_LEVELS = {  # difficulty -> (min terms, max terms, max operand, ops, max factor)
    0: None,  # a two-digit number plus or minus one digit, no carry or borrow ("43+5", "48-5"); see below
    1: (2, 2, 20, "+-", 0),
    2: (2, 3, 20, "+-*", 9),
    3: (3, 3, 50, "+-*", 12),
    4: (3, 4, 99, "+-*", 12),
}


@register_task("demo_arithmetic")
def demo_arithmetic(num_samples: int = 1000, seed: int = 0, split: str = "train", difficulty: int = 1,
                    test_fraction: float = 0.2, allow_negative: bool = False, unique: bool = False) -> list[dict]:
    """Very short integer expressions ("12+7", "3*4+5") for the CPU demo; `solution` is the short step list.

    Difficulty 0 is what a ~7M-parameter model learns in minutes and still generalises to held-out problems: the
    tens digit is copied and the units digits added or subtracted without carry, so every held-out problem's
    digit pair also occurs, under other tens digits, in the training split.
    """
    if difficulty not in _DEMO_LEVELS:
        raise ConfigError(f"builtin:demo_arithmetic: difficulty must be one of {sorted(_DEMO_LEVELS)}, "
                          f"got {difficulty}")
    if difficulty == 0:
        def make0(rng):
            tens, op = rng.randint(1, 9), rng.choice("+-")
            units = rng.randint(0, 8) if op == "+" else rng.randint(1, 9)  # room for a digit without carry/borrow
            b = rng.randint(1, 9 - units) if op == "+" else rng.randint(1, units)
            a = 10 * tens + units
            value = a + b if op == "+" else a - b
            prompt = f"{a}{op}{b}"
            return prompt, {"prompt": prompt, "answer": str(value), "solution": f"{a} {op} {b} = {value}"}

        return _draw("demo_arithmetic", split, num_samples, seed, test_fraction, make0, unique)
    lo, hi, max_value, ops, max_factor = _DEMO_LEVELS[difficulty]

    def make(rng):
        while True:
            tokens = _expression(rng, rng.randint(lo, hi), max_value, ops, max_factor)
            value, steps = _evaluate_steps(tokens)
            if value >= 0 or allow_negative:
                break
        prompt = "".join(map(str, tokens))
        return prompt, {"prompt": prompt, "answer": str(value), "solution": " , ".join(steps)}

    return _draw("demo_arithmetic", split, num_samples, seed, test_fraction, make, unique)


@register_task("demo_chain")
def demo_chain(num_samples: int = 1000, seed: int = 0, split: str = "train", num_terms: int = 3,
               test_fraction: float = 0.2, unique: bool = False) -> list[dict]:
    """A two-digit number followed by one-digit steps, no carry or borrow anywhere ("43+5-2"): the demo's task
    where writing the steps pays.

    Each step alone is what the ~7M-parameter demo model learns reliably (copy the tens digit, add or subtract
    the units); the whole chain in one go is not. `solution` is the steps written out ("43+5=48, 48-2=46").
    With 3 terms the space holds 7,290 problems, so a held-out split of hundreds is easy to draw.
    """
    if not 2 <= num_terms <= 5:
        raise ConfigError(f"builtin:demo_chain: num_terms must be 2..5, got {num_terms}")

    def make(rng):
        value = 10 * rng.randint(1, 9) + rng.randint(0, 9)
        prompt, steps = str(value), []
        for _ in range(num_terms - 1):
            units = value % 10
            # Only steps that keep the units digit in 0..9; a units digit of 0 can only go up, 9 only down.
            op = "+" if units == 0 else "-" if units == 9 else rng.choice("+-")
            d = rng.randint(1, 9 - units) if op == "+" else rng.randint(1, units)
            new = value + d if op == "+" else value - d
            steps.append(f"{value}{op}{d}={new}")
            prompt += f"{op}{d}"
            value = new
        return prompt, {"prompt": prompt, "answer": str(value), "solution": ", ".join(steps)}

    return _draw("demo_chain", split, num_samples, seed, test_fraction, make, unique)


@register_task("arithmetic")
def arithmetic(num_samples: int = 1000, seed: int = 0, split: str = "train", difficulty: int = 2,
               test_fraction: float = 0.1, unique: bool = False) -> list[dict]:
    """Multi-term integer arithmetic ("Calculate 37 + 8 * 12 - 5"); difficulty 1-5 adds terms and digits."""
    if not 1 <= difficulty <= 5:
        raise ConfigError(f"builtin:arithmetic: difficulty must be 1..5, got {difficulty}")
    max_value = 10 ** min(difficulty, 4) - 1
    max_factor = (9, 12, 20, 50, 99)[difficulty - 1]

    def make(rng):
        tokens = _expression(rng, rng.randint(2, difficulty + 2), max_value, "+-*", max_factor)
        value, steps = _evaluate_steps(tokens)
        expr = " ".join(map(str, tokens))
        solution = "\n".join(f"{'First' if i == 0 else 'Then'}, {s}." for i, s in enumerate(steps))
        return expr, {"prompt": f"Calculate {expr}", "answer": str(value),
                      "solution": f"{solution}\nSo the result is {value}."}

    return _draw("arithmetic", split, num_samples, seed, test_fraction, make, unique)


# ---------------------------------------------------------------- countdown

def _countdown_expr(rng: random.Random, nums: list[int]) -> tuple[str, int] | None:
    """Combine all `nums` with random exact operations; None when a step would go non-positive or fractional."""
    items = [(str(n), n) for n in nums]
    while len(items) > 1:
        (ea, a), (eb, b) = items.pop(rng.randrange(len(items))), items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*/")
        if op == "-" and a < b:
            (ea, a), (eb, b) = (eb, b), (ea, a)
        if op == "/" and (b == 0 or a % b):
            op = "+"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        if value <= 0:
            return None
        items.append((f"({ea} {op} {eb})", value))
    expr, value = items[0]
    return expr[1:-1], value


@register_task("countdown")
def countdown(num_samples: int = 1000, seed: int = 0, split: str = "train", num_numbers: int = 4,
              max_value: int = 25, max_target: int = 999, test_fraction: float = 0.1,
              unique: bool = False) -> list[dict]:
    """Reach `target` with the given numbers (+ - * /, each at most once); `answer` is one valid expression.

    Score with the `countdown` reward, which accepts any valid expression, not only the stored one.
    """
    if not 2 <= num_numbers <= 6:
        raise ConfigError(f"builtin:countdown: num_numbers must be 2..6, got {num_numbers}")

    def make(rng):
        for _ in range(10_000):
            nums = [rng.randint(1, max_value) for _ in range(num_numbers)]
            found = _countdown_expr(rng, nums)
            if found and 10 <= found[1] <= max_target:
                break
        else:
            raise ConfigError(f"builtin:countdown: no target in [10, {max_target}] is reachable with {num_numbers} "
                              f"numbers up to {max_value}; the problem space is too small")
        expr, target = found
        prompt = (f"Using the numbers {nums}, create an equation that equals {target}. You can use +, -, * and /, "
                  f"and each number at most once. Answer with the expression only")
        return f"{sorted(nums)}->{target}", {"prompt": prompt, "answer": expr, "numbers": nums, "target": target}

    return _draw("countdown", split, num_samples, seed, test_fraction, make, unique)


# ---------------------------------------------------------------- multi-step word problems

_NAMES = [("Tom", "He"), ("Anna", "She"), ("Ravi", "He"), ("Mei", "She"), ("Lucas", "He"), ("Sofia", "She"),
          ("Omar", "He"), ("Yuki", "She")]
_ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "cards"]


def _word_problem(rng: random.Random, scale: int) -> tuple[str, str, list[str]]:
    name, he = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b, d = rng.randint(2, 3 + 2 * scale), rng.randint(2, 4 + 4 * scale), rng.randint(1, 5 * scale)
        c = rng.randint(1, a * b)
        total = a * b
        q = (f"{name} buys {a} packs of {item} with {b} {item} in each pack. {he} gives {c} {item} to a friend and "
             f"then buys {d} more. How many {item} does {name} have now?")
        steps = [f"{name} buys {a} packs of {b} {item}, so {a} * {b} = {total} {item}.",
                 f"After giving away {c}, {total} - {c} = {total - c} {item} are left.",
                 f"Buying {d} more gives {total - c} + {d} = {total - c + d} {item}."]
        return q, str(total - c + d), steps
    if kind == 1:
        a, w = rng.randint(3, 10 * scale), rng.randint(2, 4 + 2 * scale)
        c = rng.randint(1, a * w)
        q = (f"{name} saves {a} dollars every week for {w} weeks and then spends {c} dollars on a present. "
             f"How many dollars does {name} have left?")
        steps = [f"In {w} weeks {name} saves {a} * {w} = {a * w} dollars.",
                 f"After spending {c} dollars, {a * w} - {c} = {a * w - c} dollars are left."]
        return q, str(a * w - c), steps
    if kind == 2:
        k = rng.randint(2, 2 + 2 * scale)
        b = rng.randint(2, 6 + 2 * scale)
        a = k * rng.randint(1, 3 + scale)  # a*b divisible by k
        q = (f"{name} has {a} boxes with {b} {item} in each box. {he} shares all the {item} equally among {k} "
             f"friends. How many {item} does each friend get?")
        steps = [f"There are {a} * {b} = {a * b} {item} in total.",
                 f"Shared among {k} friends, each gets {a * b} / {k} = {a * b // k} {item}."]
        return q, str(a * b // k), steps
    v, u = rng.randint(20, 40 * scale), rng.randint(20, 40 * scale)
    h, g = rng.randint(1, 2 + scale), rng.randint(1, 2 + scale)
    q = (f"A train travels at {v} km per hour for {h} hours and then at {u} km per hour for {g} hours. "
         f"How many kilometers does it travel in total?")
    steps = [f"In the first part it travels {v} * {h} = {v * h} km.",
             f"In the second part it travels {u} * {g} = {u * g} km.",
             f"In total it travels {v * h} + {u * g} = {v * h + u * g} km."]
    return q, str(v * h + u * g), steps


@register_task("word_problems")
def word_problems(num_samples: int = 1000, seed: int = 0, split: str = "train", difficulty: int = 1,
                  test_fraction: float = 0.1, unique: bool = False) -> list[dict]:
    """Multi-step word problems (shopping, savings, sharing, travel); `solution` is the readable worked answer."""
    if not 1 <= difficulty <= 5:
        raise ConfigError(f"builtin:word_problems: difficulty must be 1..5, got {difficulty}")

    def make(rng):
        q, answer, steps = _word_problem(rng, difficulty)
        return q, {"prompt": q, "answer": answer, "solution": "\n".join(steps) + f"\nThe answer is {answer}."}

    return _draw("word_problems", split, num_samples, seed, test_fraction, make, unique)


# ---------------------------------------------------------------- reasoning-gym

@register_task("gsm_symbolic")
def gsm_symbolic(num_samples: int = 1000, seed: int = 0, split: str = "train", test_fraction: float = 0.1,
                 unique: bool = False, **gym_options) -> list[dict]:
    """GSM8K-style problems from reasoning-gym's `gsm_symbolic`, with its worked solution as `solution`.

    Extra options go to reasoning-gym's dataset config (e.g. `difficulty`).
    """
    import reasoning_gym

    cache: list[dict] = []

    def make(rng):
        if not cache:
            # Generate in chunks (cheap) with seeds drawn from our split-specific RNG; _draw filters by hash.
            ds = reasoning_gym.create_dataset("gsm_symbolic", size=256, seed=rng.randrange(2**31), **gym_options)
            cache.extend(ds)
        item = cache.pop()
        cot = item["metadata"].get("answer_cot", "")
        solution = re.sub(r"\n?####.*$", "", cot.strip()).strip()
        return item["question"], {"prompt": item["question"], "answer": str(item["answer"]), "solution": solution}

    return _draw("gsm_symbolic", split, num_samples, seed, test_fraction, make, unique)


# ---------------------------------------------------------------- multilingual (shipped subset)

@register_task("multilingual")
def multilingual(num_samples: int | None = None, seed: int = 0, split: str = "train",
                 languages: list[str] | str | None = None, test_fraction: float = 0.2) -> list[dict]:
    """GSM problems in en, de, fr, zh, ja (assets/multilingual_gsm.jsonl) with `language` for the LC reward.

    A problem and all its translations share one split (hashed by problem id), so a translated test problem is
    never trained on. `num_samples=None` returns the whole split.
    """
    check_split(split)
    if isinstance(languages, str):
        languages = [x.strip() for x in languages.split(",") if x.strip()]
    rows = [json.loads(line) for line in (ASSETS / "multilingual_gsm.jsonl").read_text(encoding="utf-8").splitlines()]
    known = sorted({r["language"] for r in rows})
    if languages and set(languages) - set(known):
        raise ConfigError(f"builtin:multilingual: unknown language(s) {sorted(set(languages) - set(known))}; "
                          f"available: {', '.join(known)}")
    rows = [dict(r, task="multilingual") for r in rows
            if (not languages or r["language"] in languages)
            and split_of("multilingual", str(r["problem_id"]), test_fraction) == split]
    if num_samples is not None:
        random.Random(f"multilingual:{seed}").shuffle(rows)
        if num_samples > len(rows):
            raise ConfigError(f"builtin:multilingual: only {len(rows)} {split} samples available, asked {num_samples}")
        rows = rows[:num_samples]
    return rows


# ---------------------------------------------------------------- cold-start CoT

@register_task("cold_start")
def cold_start(num_samples: int = 1000, seed: int = 0, split: str = "train", source: str = "mixed",
               difficulty: int = 2, test_fraction: float = 0.1, unique: bool = False) -> list[dict]:
    """Readable long-CoT samples for cold-start SFT; `completion` is `<think> solution </think> <answer> N </answer>`.

    `source`: word_problems, gsm_symbolic, arithmetic, or mixed (half word problems, half gsm_symbolic). Splits
    follow the source task's own hash split, so cold-start data never contains that task's test problems.
    """
    sources = {"word_problems": word_problems, "gsm_symbolic": gsm_symbolic, "arithmetic": arithmetic}
    if source == "mixed":
        half = num_samples // 2
        samples = (word_problems(half, seed, split, min(difficulty, 5), test_fraction, unique)
                   + gsm_symbolic(num_samples - half, seed, split, test_fraction, unique))
        random.Random(f"cold_start:{seed}").shuffle(samples)
    elif source in sources:
        kwargs = {"difficulty": difficulty} if source != "gsm_symbolic" else {}
        samples = sources[source](num_samples, seed, split, test_fraction=test_fraction, unique=unique, **kwargs)
    else:
        raise ConfigError(f"builtin:cold_start: source must be mixed or one of {', '.join(sources)}, got {source!r}")
    for s in samples:
        s["completion"] = f"<think>\n{s['solution']}\n</think>\n<answer> {s['answer']} </answer>"
    return samples


def generate(task: str, **options) -> list[dict]:
    """Run the generator `builtin:<task>` with `options`, rejecting unknown tasks and options clearly."""
    if task not in TASKS:
        raise ConfigError(f"unknown built-in task {task!r}; known: {', '.join(sorted(TASKS))}")
    fn = TASKS[task]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params))
        if unknown:
            raise ConfigError(f"builtin:{task}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(params)}")
    return fn(**options)
