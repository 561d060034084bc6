"""Tensorboard scalars, console progress and PNG curves for every job."""
from megatron_r1.logging.metrics import MetricsLogger, get_logger
from megatron_r1.logging.plots import plot_run

__all__ = ["MetricsLogger", "get_logger", "plot_run"]
