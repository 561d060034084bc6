"""`megatron-r1 plot RUN_DIR [--out DIR]`: PNG curves from a run's metrics, on demand."""
from __future__ import annotations

import argparse

from megatron_r1.errors import UserError
from megatron_r1.logging.metrics import read_metrics
from megatron_r1.logging.plots import plot_run


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 plot", description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--out", default=None, help="where to write the PNGs (default RUN_DIR/plots)")
    args = ap.parse_args(argv)
    if not read_metrics(args.run_dir):
        raise UserError(f"{args.run_dir}: no metrics.jsonl with rows (is this a run directory?)")
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
