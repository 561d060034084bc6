"""Save and load training state with megatron.core.dist_checkpointing, committed atomically (see layout.py).

A checkpoint holds, in one dist_checkpointing directory:
  model       the model's sharded state dict (any TP/PP/EP layout can load it: tensors are saved as global shards)
  optimizer   `optimizer.sharded_state_dict(model_sd)` (Adam moments sharded like their parameters)
  rng_state   one ShardedObject entry per global rank (rng.py)
  common      step, consumed_samples, scheduler state, TrainState.extra, the saving layout (rank 0's copy)
and beside it `config.yaml`, the run's configuration, for humans and tools.

Every rank calls save/load together (they are collective). Errors a user can act on (no checkpoint where one is
named, a damaged one, one that does not fit the model) are CheckpointError naming the path.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_r1.checkpoint import layout, rng
from megatron_r1.config import dump_yaml
from megatron_r1.data.tokenizer import (
    CHECKPOINT_ASSETS,
    checkpoint_assets_dir,
    copy_tokenizer_files,
    is_checkpoint_tokenizer,
)
from megatron_r1.errors import CheckpointError
from megatron_r1.models.unwrap import unwrap
from megatron_r1.parallel import cpu_compat

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"

# ----------------------------------------------------------------------------------------------- collectives
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _agree(value):
    """Rank 0's `value` on every rank (a name for the temporary directory all ranks write into)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _require_dist() -> None:
    if not dist.is_initialized():
        raise RuntimeError(
            "checkpointing needs torch.distributed (call megatron_r1.parallel.init_parallel first, even for one "
            "process)"
        )


# ----------------------------------------------------------------------------------------------- state dicts
def _chunks(model) -> list:
    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _model_keys(chunks: list) -> list[str]:
    # Megatron-LM's naming: one chunk is "model", virtual pipeline chunks are "model0", "model1", ...
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_sharded(chunks: list) -> dict:
    return {key: chunk.sharded_state_dict() for key, chunk in zip(_model_keys(chunks), chunks)}


def _merged(model_sd: dict) -> dict:
    """All chunks' sharded tensors in one dict: what the optimizer maps its parameters against."""
    merged = {}
    for sd in model_sd.values():
        merged.update(sd)
    return merged


def _dist_save(sharded_sd: dict, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    cpu_compat.install()  # (16) dist_checkpointing's writer assumes a GPU
    dist_checkpointing.save(sharded_sd, str(directory))


def _dist_load(sharded_sd: dict, directory: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    cpu_compat.install()  # (16) dist_checkpointing's writer assumes a GPU
    try:
        return dist_checkpointing.load(sharded_sd, str(directory))
    except CheckpointingException as e:
        # Typically: the checkpoint lacks tensors this model has, or shapes differ (another architecture).
        raise CheckpointError(f"{directory}: does not match this model ({e})") from None
    except (OSError, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: could not be read ({type(e).__name__}: {e})") from None


def _load_common(directory: Path) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    try:
        common = dist_checkpointing.load_common_state_dict(str(directory))
    except (CheckpointingException, OSError, EOFError, RuntimeError) as e:
        raise CheckpointError(f"{directory}: could not read common.pt ({type(e).__name__}: {e})") from None
    return common


def _run_token() -> str:
    return _agree(f"{os.getpid()}-{uuid.uuid4().hex[:8]}")


# ----------------------------------------------------------------------------------------------- public API
def save_checkpoint(state, save_dir: str | Path, keep_last: int = 2) -> Path:
    """Save `state` (a TrainState) as `save_dir/iter_<step>/`; collective. Returns the committed directory.

    Written to `iter_<step>.tmp-<id>/` first, renamed into place once every rank finished, then `latest` moves.
    Leftover temporary directories of crashed saves are removed here; with `keep_last` > 0 only that many
    committed iterations are kept.
    """
    _require_dist()

    save_dir = Path(save_dir)
    rank, world = _rank(), _world()
    tmp = save_dir / layout.temp_dir_name(state.step, _run_token())
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        for stale in layout.remove_stale_temps(save_dir):
            log.warning("removed %s, left by an interrupted save", stale)
        tmp.mkdir()
    _barrier()

    chunks = _chunks(state.model)
    model_sd = _model_sharded(chunks)
    sharded_sd = dict(model_sd)
    has_moments = _optimizer_has_state(state.optimizer)
    if has_moments:
        sharded_sd["optimizer"] = state.optimizer.sharded_state_dict(_merged(model_sd), metadata=OPTIMIZER_METADATA)
    sharded_sd[rng.RNG_KEY] = rng.sharded(rank, world, rng.capture())
    ctx = state.ctx
    sharded_sd["common"] = {
        "format_version": FORMAT_VERSION,
        "step": state.step,
        "consumed_samples": state.consumed_samples,
        "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
        "extra": dict(state.extra),
        "world_size": world,
        "optimizer_state": has_moments,
        "layout": {"tp": ctx.tp_size, "pp": ctx.pp_size, "ep": ctx.ep_size, "dp": ctx.dp_size},
    }
    _dist_save(sharded_sd, tmp)
    if rank == 0:
        (tmp / CONFIG_FILE).write_text(dump_yaml(_config_to_record(state.config)))
        carry_identity(state.config, save_dir, tmp)
    _barrier()  # every rank's shards are on disk: only now may the directory become visible as a checkpoint

    final = save_dir / layout.iteration_dir_name(state.step)
    if rank == 0:
        layout.commit(save_dir, tmp, state.step)
        for old in layout.prune(save_dir, keep_last):
            log.info("removed old checkpoint %s (keep_last=%d)", old, keep_last)
    _barrier()
    return final


# HF files that describe the model beside its weights: carried from checkpoint to checkpoint so that an export
# at any stage writes the source's exact config.json (bos/eos/pad ids, float32 rms_norm_eps, ...).
MODEL_ASSETS = ("config.json", "tensor_dtypes.json", "generation_config.json")


def _config_to_record(cfg):
    """The config saved beside a checkpoint: a tokenizer that lives inside a checkpoint is recorded as `null`
    (this checkpoint's own copy, see carry_identity), never as a path into a directory that may be pruned."""
    if not is_checkpoint_tokenizer(cfg.tokenizer.path):
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.tokenizer.path = None
    return cfg


def carry_identity(cfg, save_dir: Path, iter_dir: Path) -> Path:
    """Write `iter_dir/hf/`: the run's tokenizer files (with its chat template) and the HF model files of the
    checkpoint the run started from (the previous checkpoint of `save_dir`, else `checkpoint.load`); returns it.

    So every stage's checkpoint serves, evaluates and exports with the tokenizer and config it was made with."""
    out = iter_dir / CHECKPOINT_ASSETS
    out.mkdir(exist_ok=True)
    sources = [save_dir] + ([cfg.checkpoint.load] if cfg.checkpoint.load else [])
    assets = next((a for a in map(checkpoint_assets_dir, sources) if a is not None), None)
    if assets is not None:
        for name in MODEL_ASSETS:
            if (assets / name).is_file():
                shutil.copy2(assets / name, out / name)
    copy_tokenizer_files(cfg.tokenizer.path, out)
    return out


def load_checkpoint(state, load_dir: str | Path, load_optimizer: bool = True, finetune: bool = False) -> bool:
    """Restore `state` from the checkpoint `load_dir/latest` names (or from `load_dir` if it is one); collective.

    Returns False when `load_dir` holds no committed checkpoint (a fresh run). Restores the model; and unless
    `finetune`: step, consumed_samples, TrainState.extra and the RNG (same world size only); and with
    `load_optimizer` as well: the optimizer and LR-scheduler state. `finetune` loads the weights only and starts
    counting from zero. The checkpoint may come from any TP/PP/EP layout.
    """
    _require_dist()
    load_dir = Path(load_dir)
    if not load_dir.exists():
        return False
    ckpt = layout.latest_checkpoint(load_dir)
    if ckpt is None:
        return False
    layout.verify_complete(ckpt)
    common = _load_common(ckpt).get("common")
    if not isinstance(common, dict) or common.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt}: not a megatron-r1 training checkpoint "
            f"(format {None if common is None else common.get('format_version')!r},"
            f" expected {FORMAT_VERSION}); for weights only use load_model_only"
        )
    rank, world = _rank(), _world()
    if common.get("model_only") and not finetune:
        # Weights only (a converted HF model, save_model_only): there is no optimizer, schedule or step to restore,
        # so this is the start of a fine-tuning run whatever checkpoint.finetune / load_optimizer say.
        if rank == 0:
            log.warning("%s holds model weights only: starting a fresh optimizer and LR schedule at step 0", ckpt)
        finetune = True
    restore_optimizer = load_optimizer and not finetune
    # A checkpoint written before the first optimizer step has no Adam moments to restore (Adam starts fresh).
    restore_moments = restore_optimizer and common.get("optimizer_state", True)
    restore_rng = not finetune and common["world_size"] == world

    chunks = _chunks(state.model)
    model_sd = _model_sharded(chunks)
    sharded_sd = dict(model_sd)
    if restore_moments:
        requested_optimizer = state.optimizer.sharded_state_dict(_merged(model_sd), is_loading=True,
                                                                 metadata=OPTIMIZER_METADATA)
        sharded_sd["optimizer"] = requested_optimizer
    if restore_rng:
        sharded_sd[rng.RNG_KEY] = rng.sharded(rank, world, rng.capture())
    loaded = _dist_load(sharded_sd, ckpt)

    for key, chunk in zip(_model_keys(chunks), chunks):
        _load_module(chunk, loaded[key], ckpt)
    if restore_moments:
        state.optimizer.load_state_dict(_optimizer_state(requested_optimizer, loaded["optimizer"], ckpt))
    else:
        # Mixed-precision optimizers keep fp32 copies of the weights: refresh them from the loaded model.
        state.optimizer.reload_model_params()
    if restore_optimizer:
        if state.scheduler is not None and common["scheduler"] is not None:
            _load_scheduler(state.scheduler, common["scheduler"])
    if finetune:
        state.step, state.consumed_samples = 0, 0
    else:
        state.step = int(common["step"])
        state.consumed_samples = int(common["consumed_samples"])
        state.extra.update(common.get("extra") or {})
    if restore_rng:
        rng.restore(loaded[rng.RNG_KEY])
    elif not finetune and rank == 0:
        log.warning("%s was saved by %d ranks, loading on %d: random state not restored", ckpt,
                    common["world_size"], world)
    _barrier()
    return True


# Adam moments are keyed by their parameter's checkpoint key only ("optimizer.state.exp_avg.<param>"), without
# Megatron's "chained_<i>." prefix: how parameters are split into sub-optimizers (dense / expert) depends on the
# layout, so prefixed keys would not load at another TP/EP size.
OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True}


def _optimizer_state(requested, loaded, ckpt: Path):
    """The optimizer state dict to load, in this layout's structure: moments as loaded, param groups (lr, weight
    decay: set by the current config and the scheduler) as they are now, Adam's step count from the checkpoint.

    The checkpoint's own non-tensor part follows the saving layout's structure (one optimizer, or a chain of
    dense + expert optimizers), so it is not used as is.
    """
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    step = _find(loaded, "common_step")

    def fill(req, got):
        if isinstance(req, ShardedBase):
            return got
        if isinstance(req, LocalNonpersistentObject):  # this rank's own value (e.g. param ids of a group)
            return req.unwrap()
        if isinstance(req, dict):
            out = {k: fill(v, got.get(k) if isinstance(got, dict) else None) for k, v in req.items()}
            if "state" in out and "param_groups" in out and step is not None:
                out["state"]["common_step"] = step
            return out
        if isinstance(req, list):
            return [fill(v, got[i] if isinstance(got, list) and i < len(got) else None) for i, v in enumerate(req)]
        return req

    result = fill(requested, loaded)
    if step is None:
        raise CheckpointError(f"{ckpt}: optimizer state has no step count (common_step)")
    return result


def _find(tree, key):
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for v in tree.values():
            found = _find(v, key)
            if found is not None:
                return found
    return None


def _optimizer_has_state(optimizer) -> bool:
    """Whether every rank's optimizer holds per-parameter state (Adam moments exist only after the first step)."""
    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    local = all(
        len(getattr(sub, "optimizer", None).state) > 0 for sub in subs if getattr(sub, "optimizer", None) is not None
    )
    flag = torch.tensor([1 if local else 0], dtype=torch.int32)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _load_module(chunk, state_dict: dict, ckpt: Path) -> None:
    try:
        chunk.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt}: weights do not fit this model ({e})") from None


def _load_scheduler(scheduler, sd: dict) -> None:
    # The current config's schedule (lr, warmup, decay length) wins over the checkpoint's, so a run can be
    # continued with a longer schedule; the step count comes from the checkpoint. Megatron would assert instead.
    saved = scheduler.override_opt_param_scheduler
    scheduler.override_opt_param_scheduler = True
    try:
        scheduler.load_state_dict(sd)
    finally:
        scheduler.override_opt_param_scheduler = saved


def save_model_only(model, directory: str | Path) -> Path:
    """Save only the weights of `model` (a module, DDP wrapper or list of chunks) as a dist checkpoint at
    `directory`; collective, atomic (written beside it and renamed). Loadable at any layout by load_model_only."""
    _require_dist()
    directory = Path(directory)
    rank = _rank()
    tmp = directory.parent / f"{directory.name}.tmp-{_run_token()}"
    if rank == 0:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _barrier()
    sharded_sd = _model_sharded(_chunks(model))
    sharded_sd["common"] = {"format_version": FORMAT_VERSION, "model_only": True, "world_size": _world()}
    _dist_save(sharded_sd, tmp)
    _barrier()
    if rank == 0:
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    _barrier()
    return directory


def load_model_only(model, directory: str | Path) -> Path:
    """Load weights into `model` from a training checkpoint directory (follows `latest`), an iteration
    directory, or a save_model_only directory; collective. Returns the directory read."""
    _require_dist()
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: checkpoint directory not found")
    ckpt = layout.latest_checkpoint(directory)
    if ckpt is None:
        raise CheckpointError(f"{directory}: no checkpoint (neither a `latest` file nor metadata.json)")
    layout.verify_complete(ckpt)
    chunks = _chunks(model)
    loaded = _dist_load(_model_sharded(chunks), ckpt)
    for key, chunk in zip(_model_keys(chunks), chunks):
        _load_module(chunk, loaded[key], ckpt)
    _barrier()
    return ckpt


def latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The committed checkpoint `save_dir/latest` names (None if nothing was committed)."""
    return layout.latest_checkpoint(save_dir)


def checkpoint_config_yaml(ckpt: str | Path) -> Optional[str]:
    """The config a checkpoint was saved with (text of its config.yaml), or None for model-only checkpoints."""
    ckpt = layout.latest_checkpoint(ckpt) or Path(ckpt)
    f = Path(ckpt) / CONFIG_FILE
    return f.read_text() if f.is_file() else None


__all__: Iterable[str] = (
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "save_model_only", "load_model_only",
    "checkpoint_config_yaml",
)
