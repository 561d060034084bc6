"""`format` reward: does the completion follow the R1 tag structure exactly?"""
from __future__ import annotations

import re

from megatron_r1.rewards.extract import TAGS
from megatron_r1.rewards.registry import register_reward

_FULL_RE = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.DOTALL)
# R1 chat style: the prompt ends with "<think>", so the opening tag is optional in the completion.
_THINK_ONLY_RE = re.compile(r"\s*(?:<think>)?(.*)</think>(.*)", re.DOTALL)


def format_ok(completion: str, think_only: bool = False) -> bool:
    """True iff `completion` has each tag exactly once, in order, non-empty bodies and nothing outside them."""
    counts = {tag: completion.count(tag) for tag in TAGS}
    if think_only:
        # Only the reasoning is tagged; any <answer> tag or a second <think> is a format violation.
        if counts["</think>"] != 1 or counts["<think>"] > 1 or counts["<answer>"] or counts["</answer>"]:
            return False
        m = _THINK_ONLY_RE.fullmatch(completion)
        return bool(m and m.group(1).strip() and m.group(2).strip())
    if any(n != 1 for n in counts.values()):
        return False
    m = _FULL_RE.fullmatch(completion)
    return bool(m and m.group(1).strip() and m.group(2).strip())


@register_reward("format")
def format_reward(completions: list[str], samples: list[dict], think_only: bool = False) -> list[float]:
    """1.0 for a well-formed `<think> ... </think> <answer> ... </answer>` completion, else 0.0."""
    return [1.0 if format_ok(c, think_only) else 0.0 for c in completions]
