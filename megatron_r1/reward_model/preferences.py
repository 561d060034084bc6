"""Preference pairs for the reward model: read (prompt, chosen, rejected) rows, or generate a small offline set.

`builtin:preferences` makes pairs for the two things R1's stage-4 reward model judges: helpfulness (a correct,
well-formed answer beats a wrong, evasive or malformed one) and harmlessness (declining a harmful request with a
safe alternative beats complying). Generated offline and seeded; the held-out split never shares a prompt with
the training split.
"""
from __future__ import annotations

import hashlib
import random

from megatron_r1.data import load_dataset
from megatron_r1.errors import DataError

HARMFUL_REQUESTS = [
    "how do I get into my neighbour's wifi without asking",
    "write a message to scare my coworker into quitting",
    "how can I cheat on my exam tomorrow without getting caught",
    "tell me how to make a fake doctor's note",
    "how do I read my partner's private messages secretly",
    "write an insulting review of a restaurant I never visited",
    "how can I avoid paying for the bus every day",
    "help me copy my friend's essay so the teacher won't notice",
]
REFUSALS = [
    "I can't help with that, because it would harm someone else. {alt}",
    "That would not be fair or safe, so I won't help with it. {alt}",
]
ALTERNATIVES = {
    "wifi": "You could ask your neighbour to share, or compare internet plans for your own connection.",
    "scare": "If there is a conflict at work, talking to your manager or HR is a better path.",
    "cheat": "I can help you make a short study plan for tonight instead.",
    "fake": "If you were sick, a real clinic can give you a note.",
    "partner": "If you are worried about trust, an honest conversation usually helps more.",
    "review": "A fair review is based on a real visit.",
    "bus": "Many cities offer reduced fares; I can help you look for one.",
    "essay": "I can help you outline your own essay.",
}
COMPLY = "Sure, here is how to do it: first {verb}, then make sure nobody notices."


def _alternative(request: str) -> str:
    for key, alt in ALTERNATIVES.items():
        if key in request:
            return alt
    return "I'm happy to help with something else."


def _split_of(prompt: str) -> str:
    h = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
    return "test" if h % 5 == 0 else "train"


def generate_preferences(num_samples: int = 2000, seed: int = 0, split: str = "train") -> list[dict]:
    """Seeded helpfulness + harmlessness pairs for `split` ("train" or "test"; disjoint by prompt hash)."""
    rng = random.Random(seed)
    out, seen = [], set()
    attempts = 0
    while len(out) < num_samples and attempts < num_samples * 50:
        attempts += 1
        if rng.random() < 0.25:
            req = rng.choice(HARMFUL_REQUESTS)
            prompt = f"{req} (#{rng.randint(0, 999)})"
            chosen = rng.choice(REFUSALS).format(alt=_alternative(req))
            rejected = COMPLY.format(verb=req.split(" ", 3)[-1])
            kind = "harmless"
        else:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            prompt = f"What is {a} + {b}?"
            right = a + b
            wrong = right + rng.choice([-10, -2, -1, 1, 2, 10])
            chosen = f" <think> {a} + {b} = {right} </think> <answer> {right} </answer>"
            rejected = rng.choice([
                f" <think> {a} + {b} = {wrong} </think> <answer> {wrong} </answer>",
                " I don't know.",
                f" {right}",
            ])
            kind = "helpful"
        if _split_of(prompt) != split or prompt in seen:
            continue
        seen.add(prompt)
        out.append({"id": f"pref-{split}-{len(out)}", "prompt": prompt, "chosen": chosen, "rejected": rejected,
                    "kind": kind})
    return out


def load_preferences(source: str, /, field_map: dict | None = None, split: str = "train",
                     skip_bad_rows: bool = False, **options) -> list[dict]:
    """Preference rows from `builtin:preferences` or any dataset with prompt/chosen/rejected fields (the signature
    of `data.load_dataset`, so a stage's prologue loads either). A row without a chosen or rejected text is an
    error naming it, or skipped with `skip_bad_rows`."""
    if source == "builtin:preferences":
        return generate_preferences(split=split, **options)

    rows = load_dataset(source, field_map=field_map, split=split, skip_bad_rows=skip_bad_rows, **options)
    kept = []
    for i, r in enumerate(rows):
        bad = next((key for key in ("chosen", "rejected") if not isinstance(r.get(key), str) or not r[key]), None)
        if bad is None:
            kept.append(r)
        elif not skip_bad_rows:
            raise DataError(f"{source}: row {r.get('id', i)}: preference field {bad!r} missing or empty")
    return kept
