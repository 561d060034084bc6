"""`accuracy` reward: is the extracted final answer equivalent to `sample["answer"]`?"""
from __future__ import annotations

import logging
import re
import unicodedata
from fractions import Fraction

from megatron_r1.errors import ConfigError
from megatron_r1.rewards.extract import extract_answer, last_boxed
from megatron_r1.rewards.registry import register_reward
from megatron_r1.rewards.verify_pool import VerifyPool

log = logging.getLogger(__name__)

# Unicode minus/dashes and full-width digits models emit in place of ASCII; folded before any comparison.
_MINUS = dict.fromkeys(map(ord, "\u2212\u2012\u2013\u2014\ufe63\uff0d"), "-")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?(?:/\d+)?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_MAX_DIGITS = 4000  # beyond this Fraction() itself becomes a denial-of-service; send it to the pool instead


def normalize(text: str) -> str:
    """NFKC (full-width digits), ASCII minus, trimmed; also strips `$...$` and a trailing period."""
    text = unicodedata.normalize("NFKC", text).translate(_MINUS).strip()
    if len(text) >= 2 and text[0] == "$" and text[-1] == "$":
        text = text.strip("$").strip()
    return text.rstrip(".").strip()


def plain_number(text: str) -> Fraction | None:
    """The exact value of a plain number (`-12`, `0.5`, `1/2`, `1,234`, `3e5`), else None."""
    if len(text) > _MAX_DIGITS:
        return None
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(pred: str, gold: str) -> bool:
    """String/choice equality up to case, surrounding whitespace, `$`, `\\text{}` and a trailing period."""
    def canon(s: str) -> str:
        s = normalize(s)
        s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
        return " ".join(s.casefold().split())

    return canon(pred) == canon(gold)


@register_reward("accuracy")
class AccuracyReward:
    """1.0 when the completion's answer (`<answer>` body, else last `\\boxed{}`) matches `sample["answer"]`.

    mode="math": plain numbers compare exactly in-process (fast path); everything else goes to math-verify in a
    process pool with a per-sample `timeout` (seconds), so a pathological expression cannot hang the trainer.
    mode="exact": normalized string equality, for choice or string answers.
    """

    def __init__(self, mode: str = "math", timeout: float = 5.0, num_workers: int = 2, answer_field: str = "answer"):
        if mode not in ("math", "exact"):
            raise ConfigError(f"accuracy reward: mode must be 'math' or 'exact', got {mode!r}")
        self.mode = mode
        self.answer_field = answer_field
        self.timeout = timeout
        self.num_workers = num_workers
        self._pool: VerifyPool | None = None
        self.timeouts = 0  # cumulative; CombinedReward reads the per-call delta
        self.errors = 0

    @property
    def pool(self) -> VerifyPool:
        if self._pool is None:
            self._pool = VerifyPool(self.num_workers, self.timeout)
        return self._pool

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        scores = [0.0] * len(completions)
        slow: list[tuple[int, str, str]] = []
        for i, (completion, sample) in enumerate(zip(completions, samples, strict=True)):
            pred = extract_answer(completion)
            if pred is None or not pred.strip():
                continue
            gold = str(sample[self.answer_field])
            if self.mode == "exact":
                scores[i] = float(exact_match(pred, gold))
                continue
            # "<answer>\\boxed{5}</answer>" is common: judge the boxed content so plain numbers take the fast path.
            pred = last_boxed(pred) or pred
            pred_n, gold_n = normalize(pred), normalize(gold)
            a, b = plain_number(pred_n), plain_number(gold_n)
            if a is not None and b is not None:
                scores[i] = float(a == b)
            else:
                slow.append((i, pred_n, gold_n))
        if slow:
            for (i, _, _), verdict in zip(slow, self.pool.verify_many([(p, g) for _, p, g in slow])):
                scores[i] = float(verdict.ok)
                if verdict.timed_out:
                    self.timeouts += 1
                    log.warning("accuracy: math-verify timed out after %.1fs on sample %d", self.timeout, i)
                elif verdict.error:
                    self.errors += 1
                    log.warning("accuracy: math-verify failed on sample %d: %s", i, verdict.error)
        return scores

    def close(self) -> None:
        """Stop the math-verify workers (restarted lazily on the next call)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None
