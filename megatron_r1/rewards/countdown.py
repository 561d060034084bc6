"""`countdown` reward: does the answer reach `sample["target"]` using `sample["numbers"]`, each at most once?"""
from __future__ import annotations

import ast
import operator
from collections import Counter
from fractions import Fraction

from megatron_r1.rewards.accuracy import normalize
from megatron_r1.rewards.extract import extract_answer
from megatron_r1.rewards.registry import register_reward

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node, used: list[int]) -> Fraction:
    """Exact value of an arithmetic AST of integer literals and + - * /; anything else raises ValueError."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _evaluate(node.left, used), _evaluate(node.right, used)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return Fraction(_OPS[type(node.op)](left, right))
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    raise ValueError(f"not allowed in a countdown expression: {ast.dump(node)[:40]}")


def countdown_ok(expression: str, numbers: list[int], target: int) -> bool:
    """True iff `expression` uses only +-*/ and parentheses over `numbers` (each at most once) and equals `target`."""
    expression = normalize(expression).replace("\u00d7", "*").replace("\u00f7", "/")
    expression = expression.split("=")[0]  # "3*4 = 12" states the target; the left side is the expression
    if len(expression) > 200:
        return False
    try:
        tree = ast.parse(expression, mode="eval")
        used: list[int] = []
        value = _evaluate(tree.body, used)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return False
    return not (Counter(used) - Counter(numbers)) and value == target


@register_reward("countdown")
def countdown_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """1.0 for a valid expression reaching the target (any valid one, not only the stored example answer)."""
    scores = []
    for completion, sample in zip(completions, samples, strict=True):
        expr = extract_answer(completion)
        scores.append(float(expr is not None and countdown_ok(expr, sample["numbers"], int(sample["target"]))))
    return scores
