"""Shared pytest setup: CPU threads, the `gpu` and `slow` markers, Triton's CPU interpreter."""
import os

# Triton kernels run on the CPU through the interpreter in tests; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
