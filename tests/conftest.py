"""Shared pytest setup: CPU threads, the `gpu` and `slow` markers, Triton's CPU interpreter."""
import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter where there is no GPU; must be set before triton is
# imported (on a GPU machine they run compiled).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
