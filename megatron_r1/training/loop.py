"""What every training stage's loop shares: resume at start, periodic atomic checkpoints, logging, progress.

A stage supplies `run_one_step(state) -> dict` (its metrics); this drives it from the resumed step to the end.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_r1.config import Config, dump_yaml
from megatron_r1.errors import CheckpointError
from megatron_r1.logging import MetricsLogger, get_logger, plot_run
from megatron_r1.training.setup import TrainState

log = get_logger()


def maybe_kill_for_test(step: int) -> None:
    """Test hook: `MEGATRON_R1_TEST_KILL_AFTER_STEP=k` SIGKILLs this process right after step k (and its
    checkpoint), so resume tests exercise a real crash rather than a clean return."""
    k = os.environ.get("MEGATRON_R1_TEST_KILL_AFTER_STEP")
    if k is not None and int(k) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def resume_or_init(state: TrainState,
                   init_from: Optional[Callable[[TrainState, str], None]] = None) -> Optional[str]:
    """Resume from `checkpoint.save` if it holds a checkpoint, else initialise from `checkpoint.load` if given
    (with `init_from(state, dir)` when the stage loads only part of its model there, as the reward model's trunk).

    Returns the directory loaded from (None when starting fresh)."""
    from megatron_r1.checkpoint import latest_checkpoint, load_checkpoint

    ck = state.config.checkpoint
    if ck.save and latest_checkpoint(ck.save) is not None:
        load_checkpoint(state, ck.save, load_optimizer=True, finetune=False)
        return ck.save
    if ck.load:
        if init_from is not None:
            init_from(state, ck.load)
            return ck.load
        ok = load_checkpoint(state, ck.load, load_optimizer=ck.load_optimizer and not ck.finetune,
                             finetune=ck.finetune)
        if not ok:
            raise CheckpointError(f"{ck.load}: no checkpoint found (checkpoint.load); expected a `latest` file")
        return ck.load
    return None


def write_run_config(cfg: Config, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def run_loop(state: TrainState, total_steps: int, run_one_step: Callable[[TrainState], dict], desc: str,
             on_save: Optional[Callable[[TrainState], None]] = None) -> dict:
    """Drive `run_one_step` from `state.step` to `total_steps` with logging, checkpoints and a progress bar;
    return the last step's metrics (empty when a resumed run had no step left)."""
    from megatron_r1.checkpoint import save_checkpoint

    cfg = state.config
    run_dir = Path(cfg.logging.run_dir)
    is_log = state.ctx.is_logging_rank
    if is_log:
        write_run_config(cfg, run_dir)
        log.info("%s: %d steps (from step %d), run dir %s", desc, total_steps, state.step, run_dir)
    metrics_logger = MetricsLogger.from_config(cfg, enabled=is_log)
    bar = None
    if is_log and cfg.logging.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc=desc, dynamic_ncols=True)
    ck = cfg.checkpoint
    ran = False
    metrics: dict = {}
    try:
        while state.step < total_steps:
            ran = True
            t0 = time.perf_counter()
            metrics = run_one_step(state)
            metrics["time/step_s"] = time.perf_counter() - t0
            written = metrics_logger.log(state.step, metrics)
            if bar is not None:
                bar.update(1)
                shown = {k: f"{v:.4g}" for k, v in written.items() if k in ("loss", "reward", "accuracy", "lr")}
                bar.set_postfix(shown)
            if ck.save and ck.save_interval and state.step % ck.save_interval == 0 and state.step < total_steps:
                save_checkpoint(state, ck.save, keep_last=ck.keep_last)
                if on_save is not None:
                    on_save(state)
            maybe_kill_for_test(state.step)
        if ck.save and ran:
            save_checkpoint(state, ck.save, keep_last=ck.keep_last)
            if on_save is not None:
                on_save(state)
    finally:
        if bar is not None:
            bar.close()
        metrics_logger.close()
    if is_log and cfg.logging.plots:
        plot_run(run_dir)
    return dict(metrics)
