"""csrc/ compiles with nvcc into an importable torch extension, and dispatch would pick it on a GPU.

The kernels cannot run without a GPU; test_gpu.py checks their numbers on a lent GPU machine.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_r1.ops import cuda_ext
from megatron_r1.ops.dispatch import ENV, select_backend

CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))


def _nvcc():
    return (CUDA_HOME / "bin" / "nvcc").exists() or shutil.which("nvcc")


pytestmark = pytest.mark.skipif(
    not _nvcc() or torch.version.cuda is None, reason="needs nvcc and a CUDA build of torch")


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """The extension built once per session into a fresh directory, so the compile really runs — with the build
    environment `cuda_ext.build_env()` sets up by itself (CUDA_HOME, arch list, torch's CUDA headers), as a user's
    first call would."""
    try:
        cuda_ext._module = None
        yield cuda_ext.load(build_dir=tmp_path_factory.mktemp("ext"))
    finally:
        if not torch.cuda.is_available():
            cuda_ext._module = None  # the built module is useless here; keep dispatch's view honest


def test_sources_are_found():
    src = cuda_ext.source_dir()
    assert (src / "grpo_ops_kernels.cu").is_file() and (src / "grpo_ops.cpp").is_file()


def test_build_env_points_at_the_pip_cuda_headers():
    env = cuda_ext.build_env()
    if "CPATH" in env:
        assert any(Path(p, "cublas_v2.h").exists() for p in env["CPATH"].split(os.pathsep))


@pytest.mark.slow  # nvcc compiles the kernels (~40 s)
def test_extension_builds_and_imports(ext):
    for name in ("lse_forward", "lse_backward", "policy_loss_forward", "group_advantages"):
        assert callable(getattr(ext, name))
    if not torch.cuda.is_available():
        # the module's own argument check runs before any kernel launch
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            ext.group_advantages(torch.zeros(4), 2, True, 1e-6)
        with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
            ext.lse_forward(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0, 1.0, False)


@pytest.mark.slow
def test_dispatch_would_select_the_extension(ext, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert select_backend("cuda", available={"cuda", "triton", "torch", "reference"}) == "cuda"
    rows = cuda_ext.CudaRows(ext)
    assert rows.name == "cuda" and not rows.stats_clobbers_input
    if not torch.cuda.is_available():
        assert not cuda_ext.available()  # no GPU: never claims to run
