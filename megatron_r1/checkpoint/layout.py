"""Where checkpoints live on disk and how one is committed: iteration directories, the `latest` pointer, cleanup.

    save_dir/
      iter_0000010/            a complete dist_checkpointing directory (+ config.yaml)
      iter_0000020/
      iter_0000030.tmp-<id>/   a save in progress (or one that crashed): never loadable, removed at the next save
      latest                   text file naming the newest complete iteration directory; replaced last, atomically

A save writes into the `.tmp-<id>` directory, is renamed into place only after every rank finished writing, and
`latest` moves after that; so a crash at any point leaves `latest` naming a complete checkpoint (or nothing).
All functions here are file-system only (no collectives); the caller decides which rank runs them.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from megatron_r1.errors import CheckpointError

LATEST = "latest"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_TMP_RE = re.compile(r"^iter_\d{7,}\.tmp-")


def iteration_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


def temp_dir_name(step: int, token: str) -> str:
    return f"{iteration_dir_name(step)}.tmp-{token}"


def is_dist_checkpoint(path: Path) -> bool:
    """A directory written by dist_checkpointing (its metadata.json names the strategy)."""
    return (path / "metadata.json").is_file()


def committed_iterations(save_dir: Path) -> list[tuple[int, Path]]:
    """Complete iteration directories in `save_dir`, oldest first (temporary ones are never listed)."""
    if not save_dir.is_dir():
        return []
    found = []
    for child in save_dir.iterdir():
        m = _ITER_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(save_dir: str | Path) -> Optional[Path]:
    """The iteration directory `save_dir/latest` names, or None when there is no `latest` (nothing committed).

    `save_dir` may also be an iteration directory itself (it is returned as is). A `latest` that names a
    directory that is not there is an error, not "no checkpoint": silently starting from scratch would throw
    away a run.
    """
    save_dir = Path(save_dir)
    if is_dist_checkpoint(save_dir):
        return save_dir
    pointer = save_dir / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not name or "/" in name or name in (".", ".."):
        raise CheckpointError(f"{pointer}: does not name an iteration directory (content {name!r})")
    target = save_dir / name
    if not target.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, but {target} does not exist")
    return target


def step_of(path: Path) -> Optional[int]:
    m = _ITER_RE.match(path.name)
    return int(m.group(1)) if m else None


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once the directory entry is flushed; without this a power loss could bring back
    # `latest` pointing to the old name or lose the renamed directory.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_latest(save_dir: Path, iter_name: str) -> None:
    """Point `latest` at `iter_name` by writing a temporary file and renaming it over the old one (atomic)."""
    tmp = save_dir / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(iter_name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, save_dir / LATEST)
    _fsync_dir(save_dir)


def commit(save_dir: Path, tmp_dir: Path, step: int) -> Path:
    """Rename a finished temporary directory into place, then move `latest` to it. Returns the final path."""
    final = save_dir / iteration_dir_name(step)
    if final.exists():
        # Saving the same step twice (e.g. a resumed run re-saving its start): the new one replaces the old. If
        # `latest` names it, it is briefly absent; a crash in that window is reported clearly by load.
        trash = save_dir / f"{final.name}.tmp-replaced-{os.getpid()}"
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.rename(tmp_dir, final)
    _fsync_dir(save_dir)
    write_latest(save_dir, final.name)
    return final


def remove_stale_temps(save_dir: Path, keep: Optional[Path] = None) -> list[Path]:
    """Delete leftovers of crashed saves (`iter_*.tmp-*`), except `keep` (the save now in progress)."""
    removed = []
    if not save_dir.is_dir():
        return removed
    for child in save_dir.iterdir():
        if _TMP_RE.match(child.name) and (keep is None or child.resolve() != keep.resolve()):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def prune(save_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` committed iterations; never the one `latest` names."""
    if keep_last <= 0:
        return []
    pointer = save_dir / LATEST
    current = pointer.read_text().strip() if pointer.is_file() else None
    iters = committed_iterations(save_dir)
    removed = []
    for _, path in iters[: max(0, len(iters) - keep_last)]:
        if path.name == current:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def verify_complete(ckpt_dir: Path) -> None:
    """Raise CheckpointError unless `ckpt_dir` holds a readable dist_checkpointing checkpoint with every shard.

    Run identically on every rank before any collective load, so a damaged checkpoint fails everywhere with one
    clear message instead of one rank raising while the others wait in a collective.
    """
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: checkpoint directory not found")
    meta = ckpt_dir / "metadata.json"
    if not meta.is_file():
        raise CheckpointError(f"{ckpt_dir}: not a checkpoint (no metadata.json)")
    try:
        json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta}: corrupt checkpoint metadata ({e})") from None
    if not (ckpt_dir / "common.pt").is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (common.pt missing)")
    if not (ckpt_dir / ".metadata").is_file():
        raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint (.metadata, the shard index, is missing)")
    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(str(ckpt_dir)).read_metadata()
    except (EOFError, OSError, RuntimeError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{ckpt_dir / '.metadata'}: corrupt shard index ({type(e).__name__}: {e})") from None
    needed: dict[str, int] = {}
    for info in (index.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(needed.items()):
        f = ckpt_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{ckpt_dir}: incomplete checkpoint, shard file {rel} is missing")
        actual = f.stat().st_size
        if actual < size:
            raise CheckpointError(f"{f}: truncated shard file ({actual} bytes, the index needs {size})")
