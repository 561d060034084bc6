"""What the JIT-built extensions of csrc/ share: finding their sources, where builds are cached, the build's
environment (`ninja` on PATH).

Two loaders use it: `megatron_r1.ops.cuda_ext` (the GRPO CUDA kernels, on a GPU) and
`megatron_r1.inference.cpu_kernels` (the fused CPU decode step).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


_PKG = Path(__file__).resolve().parent  # the megatron_r1 package


def csrc_dir(sources) -> Path:
    """The first directory holding every one of `sources`: the checkout's csrc/, then the copy shipped inside the
    installed package (megatron_r1/csrc/, package data)."""
    for cand in (_PKG.parent / "csrc", _PKG / "csrc"):
        if all((cand / s).is_file() for s in sources):
            return cand
    raise FileNotFoundError(f"sources {tuple(sources)} not found in {_PKG.parent / 'csrc'} or {_PKG / 'csrc'}")


def cache_root() -> Path:
    """Where builds go: $MEGATRON_R1_EXT_DIR, else ~/.cache/megatron_r1/torch_extensions."""
    return Path(os.environ.get("MEGATRON_R1_EXT_DIR", Path.home() / ".cache" / "megatron_r1" / "torch_extensions"))


@contextlib.contextmanager
def patched_environ(extra: dict):
    """os.environ with `extra` set inside the block, restored (or removed) after it."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ninja_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; the pip `ninja` package (a dependency) installs it into
    the venv's bin/, which is not on PATH when the venv's python runs without the venv activated."""
    try:
        import ninja

        bin_dir = str(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        bin_dir = None
    path = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in path.split(os.pathsep):
        return patched_environ({"PATH": bin_dir + os.pathsep + path})
    return contextlib.nullcontext()
