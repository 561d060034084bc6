"""User-plugin rewards for the RL tests (loaded by dotted name, as users' own rewards are)."""


def digit_share(completions, samples):
    """Share of characters that are digits: dense, trivially learnable from a random model."""
    return [sum(c.isdigit() for c in text) / max(1, len(text)) for text in completions]


def flaky(completions, samples):
    """Raises for prompts of odd length (whole batch or one by one): the run must go on and count the errors."""
    if any(len(s["prompt"]) % 2 for s in samples):
        raise RuntimeError("flaky reward failed")
    return [1.0] * len(completions)


def says_think(completions, samples):
    """1.0 when the answer contains the `<think>` tag: one token to find, so a random model learns it quickly."""
    return [1.0 if "<think>" in text else 0.0 for text in completions]


def starts_a_to_m(completions, samples):
    """1.0 when the answer's first letter is in a..m (about a fifth of a random model's answers)."""
    out = []
    for text in completions:
        first = next((ch for ch in text if not ch.isspace()), "")
        out.append(1.0 if first.isascii() and first.isalpha() and first.lower() in "abcdefghijklm" else 0.0)
    return out
