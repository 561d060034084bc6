"""Weights & Biases as an optional second sink beside tensorboard (`logging.wandb=true`).

wandb is an optional import (`pip install "megatron-r1[wandb]"`): without it a run warns once and keeps logging to
tensorboard and metrics.jsonl. `logging.wandb_mode=offline` (the default) writes the run under
`run_dir/wandb/offline-run-*` with no network; `wandb sync` uploads it later.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Mapping, Optional

from megatron_r1.logging.console import get_logger

log = get_logger()


class WandbSink:
    """One wandb run: the run config once at start, then the same scalars as tensorboard at each step."""

    def __init__(self, run):
        self.run = run

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        self.run.finish()


def open_wandb(run_dir: str | Path, project: str, mode: str, config: Optional[dict] = None) -> Optional[WandbSink]:
    """A WandbSink writing under `run_dir`, or None (with a warning) when wandb is not installed."""
    try:
        wandb = importlib.import_module("wandb")
    except ImportError as e:
        log.warning("logging.wandb=true but wandb is not importable (%s); logging to tensorboard and "
                    "metrics.jsonl only (pip install wandb)", e)
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, dir=str(run_dir), mode=mode, config=config or {}, name=run_dir.name,
                     reinit="finish_previous")
    return WandbSink(run)
