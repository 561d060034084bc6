"""Checkpoints: megatron.core.dist_checkpointing save/load with atomic commit, resume and resharding.

Layout and commit protocol in `layout.py`; what is saved in `checkpointing.py`; per-rank RNG in `rng.py`.
HF <-> Megatron conversion lives in the `convert` subpackage.
"""
from megatron_r1.checkpoint.checkpointing import (
    checkpoint_config_yaml,
    latest_checkpoint,
    load_checkpoint,
    load_model_only,
    save_checkpoint,
    save_model_only,
)

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "save_model_only",
    "load_model_only",
    "checkpoint_config_yaml",
]
