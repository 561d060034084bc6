"""What the JIT-built extensions of csrc/ share: where builds are cached, and finding `ninja`.

Two loaders use it: `megatron_r1.ops.cuda_ext` (the GRPO CUDA kernels, on a GPU) and
`megatron_r1.inference.cpu_kernels` (the fused CPU decode step).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Where builds go: $MEGATRON_R1_EXT_DIR, else ~/.cache/megatron_r1/torch_extensions."""
    return Path(os.environ.get("MEGATRON_R1_EXT_DIR", Path.home() / ".cache" / "megatron_r1" / "torch_extensions"))


@contextlib.contextmanager
def ninja_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; the pip `ninja` package (a dependency) installs it into
    the venv's bin/, which is not on PATH when the venv's python runs without the venv activated."""
    try:
        import ninja

        bin_dir = str(Path(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        bin_dir = None
    saved = os.environ.get("PATH", "")
    if bin_dir and bin_dir not in saved.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + saved
    try:
        yield
    finally:
        os.environ["PATH"] = saved
