"""Which implementation runs an op: CUDA (csrc/) > Triton > chunked torch, by device and availability.

`MEGATRON_R1_OPS=reference|torch|triton|cuda` overrides the choice for every op (tests, debugging, benchmarks).
On a CPU tensor the default is the chunked torch path: Triton only runs there through its interpreter, which is
for tests.
"""
import importlib.util
import os

from . import cuda_ext, rows_torch

BACKENDS = ("reference", "torch", "triton", "cuda")
ENV = "MEGATRON_R1_OPS"
_PREFERENCE = ("cuda", "triton", "torch")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends(device_type: str) -> set:
    """Backends that can run on `device_type` here; probing "cuda" builds csrc/ once (cached)."""
    found = {"reference", "torch"}
    if device_type == "cuda":
        if _triton_importable():
            found.add("triton")
        if cuda_ext.available():
            found.add("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable():
        found.add("triton")
    return found


def select_backend(device_type: str, available=None) -> str:
    """The backend for tensors on `device_type`: the env override, else the best of `available`.

    `available` defaults to what this machine offers (see available_backends); tests pass it to ask what the
    choice would be elsewhere.
    """
    forced = os.environ.get(ENV, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if forced == "cuda" and device_type != "cuda":
            raise ValueError(f"{ENV}=cuda but the tensors are on {device_type!r}")
        return forced
    if device_type != "cuda":
        return "torch"
    avail = available_backends(device_type) if available is None else set(available)
    for name in _PREFERENCE:
        if name in avail:
            return name
    return "reference"


def rows_for(backend: str):
    """The per-row kernels object chunked.py drives for `backend` (None for the reference)."""
    if backend == "torch":
        return rows_torch.TorchRows()
    if backend == "triton":
        from .triton_kernels import TritonRows

        return TritonRows()
    if backend == "cuda":
        return cuda_ext.CudaRows()
    return None
