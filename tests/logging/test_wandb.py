"""logging.wandb: the same scalars and the run config go to wandb; a real offline run needs no network; without
wandb installed the run warns and keeps its other sinks."""
import logging
import sys
import time
import types

import pytest

from megatron_r1.config import load_config, to_dict
from megatron_r1.logging.metrics import MetricsLogger, get_logger, read_metrics


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"logging.run_dir={tmp_path}/run", "logging.tensorboard=false", "logging.wandb=true",
                              *overrides])


class _FakeRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def test_same_scalars_and_run_config_reach_wandb(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = _cfg(tmp_path, "rl.policy_loss=cispo")
    lg = MetricsLogger.from_config(cfg)
    lg.log(1, {"reward": 0.5, "loss": 1.25, "text": "not a scalar"})
    lg.log(2, {"reward": 0.75})
    lg.close()
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["project"] == "megatron-r1"
    assert run.init["dir"] == f"{tmp_path}/run" and run.init["config"] == to_dict(cfg)
    assert run.init["config"]["rl"]["policy_loss"] == "cispo"
    jsonl = [{k: v for k, v in r.items() if k not in ("step", "time")} for r in read_metrics(tmp_path / "run")]
    assert [d for _, d in run.logged] == jsonl and [s for s, _ in run.logged] == [1, 2]
    assert run.finished


def test_without_wandb_the_run_warns_and_keeps_logging(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    get_logger().addHandler(handler)
    try:
        lg = MetricsLogger.from_config(_cfg(tmp_path))
        lg.log(1, {"reward": 0.5})
        lg.close()
    finally:
        get_logger().removeHandler(handler)
    assert any("wandb is not importable" in m for m in seen), seen
    assert read_metrics(tmp_path / "run")[0]["reward"] == 0.5


@pytest.mark.slow  # starts wandb's service process
def test_a_real_offline_run_writes_its_history_locally(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the dev extra installs it
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = MetricsLogger.from_config(_cfg(tmp_path, "rl.kl_clamp=7.5"))
    lg.log(1, {"reward_probe_key": 0.125})
    lg.close()
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (log_file,) = run_dir.glob("*.wandb")
    # protobuf records: keys and JSON values are stored as plain strings. wandb's service process may still be
    # flushing after finish() returns, so wait for the history record (bounded) instead of reading once.
    deadline = time.monotonic() + 60
    raw = log_file.read_bytes()
    while b"reward_probe_key" not in raw and time.monotonic() < deadline:
        time.sleep(0.5)
        raw = log_file.read_bytes()
    assert b"reward_probe_key" in raw and b"0.125" in raw
    assert b"kl_clamp" in raw and b"7.5" in raw
