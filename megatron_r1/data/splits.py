"""Deterministic train/test assignment by a hash of the canonical problem, so splits can never overlap."""
from __future__ import annotations

import hashlib

from megatron_r1.errors import ConfigError

SPLITS = ("train", "test")


def split_of(task: str, key: str, test_fraction: float) -> str:
    """'test' or 'train' for the problem `key` of `task`: a pure function of both, independent of any seed.

    Every generator draws candidates and keeps only those whose split matches the one asked for, so a problem
    (same canonical key) can only ever appear in one split, however many samples or which seeds are used.
    """
    digest = hashlib.sha256(f"{task}\x00{key}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return split
