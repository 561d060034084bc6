"""The bare model inside its wrappers: one rule for training, checkpoints, conversion and the engine.

Imports nothing (no torch, no Megatron), so every layer can use it without an import cycle.
"""
from __future__ import annotations


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (each holds the next one as `.module`).

    Stops at the first object with a `decoder` (a GPTModel), even one that also has a `.module` attribute.
    """
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model
