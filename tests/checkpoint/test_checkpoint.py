"""Checkpoints: what a save holds comes back on load, commits are atomic, damage is reported, layouts reshard.

Every test runs its ranks through tests/distributed.py (dist_checkpointing is collective even for one process).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_r1.errors import CheckpointError
from tests.distributed import run_distributed
from tests.parallel import tiny_model as tm


def _state(tp=1, pp=1, ep=1, seed=1234, extra=()):
    from megatron_r1.parallel import init_parallel
    from megatron_r1.training import build_train_state

    cfg = tm.tiny_config(tp=tp, pp=pp, ep=ep, extra=extra)
    ctx = init_parallel(cfg.parallel, seed)
    return build_train_state(cfg, ctx, total_steps=10)


def _weights(state) -> dict:
    return {k: v.detach().clone() for k, v in tm.unwrap(state.model[0]).state_dict().items()
            if not k.endswith("_extra_state")}


def _adam_moments(state) -> list:
    out = []
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                s = opt.optimizer.state.get(p, {})
                out.append((s["exp_avg"].clone(), s["exp_avg_sq"].clone()) if "exp_avg" in s else None)
    return out


def _equal_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- round trip
def _roundtrip(rank, world_size, save_dir):
    import random

    from megatron_r1.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    steps = tm.global_batches(3)
    a = _state(seed=1)
    tm.run_steps(a, steps[:1])
    a.consumed_samples = 8
    a.extra["data_epoch"] = 3
    path = save_checkpoint(a, save_dir)
    latest = latest_checkpoint(save_dir)
    assert path == Path(save_dir) / "iter_0000001" and latest == path, (path, latest)
    assert (path / "config.yaml").read_text().startswith("stage:")
    after_save = (torch.rand(3), random.random())
    tm.run_steps(a, steps[1:])  # the run that was never interrupted

    b = _state(seed=2)  # different initial weights and RNG: everything must come from the checkpoint
    assert load_checkpoint(b, save_dir) is True
    after_load = (torch.rand(3), random.random())
    assert torch.equal(after_save[0], after_load[0]) and after_save[1] == after_load[1], "RNG not restored"
    assert (b.step, b.consumed_samples, b.extra["data_epoch"]) == (1, 8, 3)
    assert b.scheduler.num_steps == 1
    tm.run_steps(b, steps[1:])  # the resumed run: identical weights and Adam moments afterwards
    _equal_dicts(_weights(a), _weights(b))
    for x, y in zip(_adam_moments(a), _adam_moments(b)):
        assert (x is None) == (y is None) and (x is None or (torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])))
    assert b.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]

    c = _state(seed=3)  # finetune: weights only, counters from zero
    assert load_checkpoint(c, save_dir, finetune=True) is True
    assert (c.step, c.consumed_samples) == (0, 0)
    assert all(m is None for m in _adam_moments(c)), "finetune must not load optimizer state"
    return True


@pytest.mark.slow
def test_save_load_restores_everything_and_continues_identically(tmp_path):
    run_distributed(_roundtrip, 1, str(tmp_path / "ckpt"))


# ----------------------------------------------------------------------------------------------- atomic commit
def _crash_mid_save(rank, world_size, save_dir):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_r1.checkpoint import load_checkpoint, save_checkpoint

    state = _state()
    state.step = 1
    save_checkpoint(state, save_dir)
    state.step = 2
    writer = filesystem_async.FileSystemWriterAsync
    original = writer.finish

    def die_before_index(self, *args, **kwargs):
        # Every shard file is on disk by now; the index (.metadata) and metadata.json are not.
        raise OSError("simulated crash in the checkpoint writer")

    writer.finish = die_before_index
    try:
        save_checkpoint(state, save_dir)
    except Exception as e:  # whatever dist_checkpointing turns the writer's death into
        crashed = f"{type(e).__name__}: {e}"
    else:
        raise AssertionError("the save did not fail")
    finally:
        writer.finish = original

    root = Path(save_dir)
    temps = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert (root / "latest").read_text().strip() == "iter_0000001", crashed
    assert not (root / "iter_0000002").exists()
    assert temps and any(f.suffix == ".distcp" for t in temps for f in t.iterdir()), "expected a half-written save"

    fresh = _state(seed=7)
    assert load_checkpoint(fresh, save_dir) and fresh.step == 1

    state.step = 3
    save_checkpoint(state, save_dir)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name], "stale temporary directory not cleaned"
    assert (root / "latest").read_text().strip() == "iter_0000003"
    return True


@pytest.mark.slow
def test_crash_mid_save_keeps_previous_checkpoint_and_is_cleaned_next_time(tmp_path):
    run_distributed(_crash_mid_save, 1, str(tmp_path / "ckpt"))


def _keep_last(rank, world_size, save_dir):
    from megatron_r1.checkpoint import save_checkpoint

    state = _state()
    for step in (1, 2, 3):
        state.step = step
        save_checkpoint(state, save_dir, keep_last=2)
    return sorted(p.name for p in Path(save_dir).iterdir())


@pytest.mark.slow
def test_keep_last_removes_older_iterations(tmp_path):
    names = run_distributed(_keep_last, 1, str(tmp_path / "ckpt"))[0]
    assert names == ["iter_0000002", "iter_0000003", "latest"]


# ----------------------------------------------------------------------------------------------- damage
def _load_expecting(rank, world_size, path, model_only):
    from megatron_r1.checkpoint import load_checkpoint, load_model_only

    state = _state()
    try:
        if model_only:
            load_model_only(state.model, path)
        else:
            return ("returned", load_checkpoint(state, path))
    except CheckpointError as e:
        return ("error", str(e))
    return ("returned", True)


def _save_two(rank, world_size, save_dir):
    from megatron_r1.checkpoint import save_checkpoint

    state = _state()
    for step in (1, 2):
        state.step = step
        save_checkpoint(state, save_dir)
    return True


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved") / "ckpt"
    run_distributed(_save_two, 1, str(root))
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _damage_cases(saved: Path, tmp: Path):
    truncated = _copy(saved, tmp / "truncated_metadata")
    meta = truncated / "iter_0000002" / "metadata.json"
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])

    missing_shard = _copy(saved, tmp / "missing_shard")
    next((missing_shard / "iter_0000002").glob("*.distcp")).unlink()

    short_shard = _copy(saved, tmp / "short_shard")
    shard = next((short_shard / "iter_0000002").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])

    dangling = _copy(saved, tmp / "dangling_latest")
    (dangling / "latest").write_text("iter_0000009\n")

    return [
        (truncated, "metadata.json"),
        (missing_shard, ".distcp is missing"),
        (short_shard, "truncated shard"),
        (dangling, "iter_0000009"),
    ]


@pytest.mark.slow
def test_damaged_checkpoints_raise_checkpoint_error_naming_the_path(saved, tmp_path):
    cases = _damage_cases(saved, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    for path, words in cases:
        kind, msg = run_distributed(_load_expecting, 1, str(path), False)[0]
        assert kind == "error", f"{path}: loaded without error"
        assert str(path) in msg and words in msg, msg
    # Nothing committed is not an error for a training run (it starts fresh) ...
    assert run_distributed(_load_expecting, 1, str(empty), False)[0] == ("returned", False)
    assert run_distributed(_load_expecting, 1, str(tmp_path / "absent"), False)[0] == ("returned", False)
    # ... but a tool asking for weights gets a clear error.
    kind, msg = run_distributed(_load_expecting, 1, str(empty), True)[0]
    assert kind == "error" and str(empty) in msg


@pytest.mark.slow
def test_layout_verification_without_processes(saved, tmp_path):
    """The file-level checks alone (no ranks needed): they run before any collective on every rank."""
    from megatron_r1.checkpoint import layout

    layout.verify_complete(saved / "iter_0000002")
    for path, words in _damage_cases(saved, tmp_path):
        with pytest.raises(CheckpointError, match=words.replace(".", r"\.")):
            layout.verify_complete(layout.latest_checkpoint(path))
    assert layout.latest_checkpoint(tmp_path / "nothing_here") is None
    assert json.loads((saved / "iter_0000002" / "metadata.json").read_text())  # still intact


# ----------------------------------------------------------------------------------------------- resharding
def _logits(state) -> torch.Tensor:
    """Full-vocabulary logits of fixed tokens, gathered over TP (the output layer is vocab-parallel)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    model = tm.unwrap(state.model[0])
    model.eval()
    tokens = tm.global_batches(1, seed=99)[0][0][0]
    with torch.no_grad():
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        out = model(tokens, positions, None)
    model.train()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def _reshard_source(rank, world_size, save_dir):
    from megatron_r1.checkpoint import save_checkpoint

    state = _state(seed=11)
    tm.run_steps(state, tm.global_batches(1))
    save_checkpoint(state, save_dir)
    return tm.pack(_logits(state))


def _reshard_middle(rank, world_size, src_dir, dst_dir, tp, ep, load_optimizer):
    from megatron_r1.checkpoint import load_checkpoint, save_checkpoint

    state = _state(tp=tp, ep=ep, seed=22)
    assert load_checkpoint(state, src_dir, load_optimizer=load_optimizer)
    loaded = _logits(state)
    tm.run_steps(state, tm.global_batches(2)[1:])
    save_checkpoint(state, dst_dir)
    return tm.pack((loaded, _logits(state), state.step))


def _reshard_back(rank, world_size, src_dir):
    from megatron_r1.checkpoint import load_checkpoint

    state = _state(seed=33)
    assert load_checkpoint(state, src_dir)
    return tm.pack((_logits(state), state.step))


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(2, 1), (1, 2)], ids=["tp2", "ep2"])
def test_checkpoint_loads_into_another_layout_and_back(tmp_path, tp, ep):
    """TP=1 → (TP=2 | EP=2) → TP=1: after each load the logits equal the saving layout's; the optimizer state
    travels across layouts too (the middle run trains one step from the loaded Adam moments)."""
    first = tm.unpack(run_distributed(_reshard_source, 1, str(tmp_path / "a"))[0])
    middle = [tm.unpack(r) for r in run_distributed(_reshard_middle, 2, str(tmp_path / "a"), str(tmp_path / "b"),
                                                      tp, ep, True)]
    for loaded, _, step in middle:
        assert step == 2
        torch.testing.assert_close(loaded, first, rtol=1e-5, atol=1e-5)
    trained = middle[0][1]
    assert not torch.allclose(trained, first), "the middle run's step did not change the model"
    back, step = tm.unpack(run_distributed(_reshard_back, 1, str(tmp_path / "b"))[0])
    assert step == 2
    torch.testing.assert_close(back, trained, rtol=1e-5, atol=1e-5)
