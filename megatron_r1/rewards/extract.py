"""Pull the pieces rewards judge out of a completion: reasoning, answer, last \\boxed{}, last code block."""
from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The final answer: the last closed `<answer>` body, else the last `\\boxed{...}`, else None."""
    bodies = _ANSWER_RE.findall(completion)
    if bodies:
        return bodies[-1].strip()
    return last_boxed(completion)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), with nested braces matched; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None  # unbalanced: no answer rather than a truncated one


def extract_think(completion: str) -> str:
    """The reasoning text: between `<think>` and `</think>`.

    In the chat template the prompt already ends with `<think>`, so a completion without the opening tag counts
    everything before `</think>` as reasoning. Without `</think>` the reasoning is empty.
    """
    end = completion.find(THINK_CLOSE)
    if end < 0:
        return ""
    head = completion[:end]
    start = head.find(THINK_OPEN)
    return (head[start + len(THINK_OPEN):] if start >= 0 else head).strip()


def last_code_block(completion: str, languages: tuple[str, ...] = ("python", "py", "python3", "")) -> str | None:
    """The body of the last fenced block whose language tag is one of `languages` (empty tag = untagged)."""
    blocks = [body for lang, body in _FENCE_RE.findall(completion) if lang.lower() in languages]
    return blocks[-1] if blocks else None
