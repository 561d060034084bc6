"""HF checkpoint files: a lazy safetensors reader (single file or sharded with an index) and a sharded writer.

The reader opens each file with `safe_open` and reads one tensor at a time; the writer keeps at most one shard
(`max_shard_bytes`) in memory. Together they bound a conversion's extra memory by one shard plus one tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from megatron_r1.data.tokenizer import DEMO_FILE, TOKENIZER_FILES
from megatron_r1.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Copied through unchanged in both directions (tokenizer, chat template, generation defaults).
ASSET_FILES = tuple(n for n in TOKENIZER_FILES if n != DEMO_FILE)


class HFCheckpoint:
    """A read-only view of an HF model directory: config.json and the tensors, loaded one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: HF checkpoint directory not found")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"{self.path}: no config.json (is this an HF model directory?)")
        try:
            self.config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON ({e})") from None
        self.weight_map = self._weight_map()
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e.__class__.__name__}: {e})") from None
            missing = sorted({f for f in wm.values() if not (self.path / f).is_file()})
            if missing:
                raise CheckpointError(f"{self.path}: shard files named in {INDEX} are missing: {', '.join(missing)}")
            return dict(wm)
        files = [self.path / SINGLE] if (self.path / SINGLE).is_file() else sorted(self.path.glob("*.safetensors"))
        if not files:
            bins = list(self.path.glob("*.bin"))
            hint = " (only PyTorch .bin files: re-save with safe_serialization)" if bins else ""
            raise CheckpointError(f"{self.path}: no safetensors weights ({SINGLE} or {INDEX}){hint}")
        wm = {}
        for f in files:
            with self._open_file(f) as h:
                for k in h.keys():
                    wm[k] = f.name
        return wm

    @staticmethod
    def _open_file(f: Path):
        try:
            return safe_open(str(f), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None

    def names(self) -> list[str]:
        return list(self.weight_map)

    def _handle(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint "
                                  f"(does config.json match the weights?)")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = self._stack.enter_context(self._open_file(self.path / fname))
        return self._handles[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_size(text: str | int) -> int:
    """'5GB' / '500MB' / '1024' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise CheckpointError(f"--max-shard-size: cannot parse {text!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One shard file (the one place bytes hit the disk; tests replace it to simulate a full disk)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


class ShardedWriter:
    """Accumulate tensors into shards of at most `max_shard_bytes`; `close()` names them and writes the index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.max = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max:
            self._flush()
        tensor = tensor.contiguous()
        if any(t.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr() for t in self.current.values()):
            tensor = tensor.clone()  # HF's copies of a shared tensor (MTP embedding/head): safetensors wants distinct
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        write_safetensors(self.current, self.out_dir / f".shard-{idx:05d}.tmp")
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> list[str]:
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.out_dir / ".shard-00000.tmp", self.out_dir / SINGLE)
            return [SINGLE]
        weight_map, files = {}, []
        for i, names in enumerate(self.shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f".shard-{i:05d}.tmp", self.out_dir / fname)
            files.append(fname)
            weight_map.update({k: fname for k in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return files


def copy_assets(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer / generation-config files present in `src` to `dst`; returns their names."""
    copied = []
    for name in ASSET_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
