"""The fused CPU decode step (csrc/cpu_decode.cpp) as a JIT torch extension, with the torch path as fallback.

Built on first use (about 20 s with g++ and ninja; cached on disk per source, torch version and CPU), only when a
dense fp32 model decodes on the CPU. It is compiled with -march=native, so the cache key includes the CPU's
model and flags: a home directory shared by different nodes gets one build per kind of CPU.
`MEGATRON_R1_CPU_DECODE=0` turns it off (the torch path in functional.py then runs, same arithmetic).
A failed build warns once and falls back; nothing here is imported unless a CPU engine decodes.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import warnings
from pathlib import Path

import torch

from megatron_r1.jit_ext import cache_root, csrc_dir, ninja_on_path

log = logging.getLogger(__name__)
EXT_NAME = "megatron_r1_cpu_decode"
SOURCE = "cpu_decode.cpp"
ENV_SWITCH = "MEGATRON_R1_CPU_DECODE"

_module = None
_build_error = None
_lock = threading.Lock()


def source_path() -> Path:
    """csrc/cpu_decode.cpp of the checkout, else the copy shipped inside the installed package."""
    return csrc_dir([SOURCE]) / SOURCE


def _cpu_key() -> bytes:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines).encode()
    except OSError:
        return platform.processor().encode()


def _build_dir(src: Path) -> Path:
    root = cache_root()
    # The torch install's path too: the build command names its headers, so two venvs sharing one directory would
    # each see the other's command and rebuild (~45 s) on every switch.
    digest = hashlib.sha1(torch.__version__.encode() + Path(torch.__file__).parent.as_posix().encode() + _cpu_key()
                          + src.read_bytes())
    return root / f"{EXT_NAME}_{digest.hexdigest()[:12]}"


def load(verbose: bool = False):
    """Compile (if needed) and import the extension; raises if the build fails."""
    global _module
    with _lock:
        if _module is None:
            from torch.utils import cpp_extension

            src = source_path()
            out = _build_dir(src)
            out.mkdir(parents=True, exist_ok=True)
            if not any(out.glob(f"{EXT_NAME}*.so")):
                log.info("building the fused CPU decode step into %s (once per machine and torch, ~20 s)", out)
            flags = ["-O3", "-fopenmp-simd"]
            if platform.machine() in ("x86_64", "AMD64"):
                flags.append("-march=native")
            else:
                flags.append("-mcpu=native")
            with ninja_on_path():
                _module = cpp_extension.load(name=EXT_NAME, sources=[str(src)], build_directory=str(out),
                                             extra_cflags=flags, verbose=verbose)
    return _module


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def available() -> bool:
    """Whether the fused step can run: switched on and built (now, if it was not); a failed build warns once."""
    global _build_error
    if not enabled():
        return False
    if _module is not None:
        return True
    if _build_error is not None:
        return False
    try:
        load()
    except (OSError, RuntimeError, ImportError) as e:  # FileNotFoundError (no source) is an OSError
        # cpp_extension raises RuntimeError on compiler / linker errors, OSError without a toolchain or ninja
        _build_error = e
        warnings.warn(f"megatron_r1 fused CPU decode unavailable, using the torch path: {e}", RuntimeWarning)
        return False
    return True


def build_error():
    """The exception of the last failed build, or None."""
    return _build_error
