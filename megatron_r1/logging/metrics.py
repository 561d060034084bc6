"""One sink for a run's scalars: tensorboard events, a `metrics.jsonl` (for plots and tests), the console, and
Weights & Biases when asked (`logging.wandb`, see wandb_sink.py).

Only the logging rank writes (see ParallelContext.is_logging_rank); other ranks get a logger that drops
everything, so callers never branch on rank.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Mapping, Optional

import torch

from megatron_r1.config import to_dict
from megatron_r1.logging.console import get_logger as get_logger  # re-exported: its home before console.py
from megatron_r1.logging.wandb_sink import open_wandb


def _scalar(v) -> Optional[float]:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            return None
        v = v.item()
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


class MetricsLogger:
    """Write scalars to tensorboard and `run_dir/metrics.jsonl`; `enabled=False` makes every call a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, prefix: str = "",
                 wandb: bool = False, wandb_project: str = "megatron-r1", wandb_mode: str = "offline",
                 run_config: Optional[dict] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.prefix = prefix
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if wandb:
            self._wandb = open_wandb(self.run_dir, wandb_project, wandb_mode, run_config)

    @classmethod
    def from_config(cls, cfg, enabled: bool = True) -> "MetricsLogger":
        """The sinks `cfg.logging` asks for; wandb also receives the whole run config."""
        lg = cfg.logging
        return cls(lg.run_dir, enabled=enabled, tensorboard=lg.tensorboard, wandb=lg.wandb,
                   wandb_project=lg.wandb_project, wandb_mode=lg.wandb_mode,
                   run_config=to_dict(cfg) if lg.wandb else None)

    def log(self, step: int, metrics: Mapping[str, object]) -> dict:
        """Record every scalar in `metrics` at `step`; returns the plain-float dict that was written."""
        clean = {}
        for k, v in metrics.items():
            f = _scalar(v)
            if f is not None:
                clean[f"{self.prefix}{k}"] = f
        if not self.enabled:
            return clean
        for k, f in clean.items():
            if self._tb is not None and math.isfinite(f):
                self._tb.add_scalar(k, f, step)
        if self._wandb is not None:
            self._wandb.log(step, clean)
        self._jsonl.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        return clean

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of `run_dir/metrics.jsonl` (a resumed run appends; the last row per step wins)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            rows[(row.get("step"), tuple(sorted(k for k in row if k not in ("step", "time"))))] = row
    return sorted(rows.values(), key=lambda r: (r.get("step", 0), r.get("time", 0)))
