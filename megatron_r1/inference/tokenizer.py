"""Tokenizers for the engine and server: `builtin:demo`, a local HF directory / tokenizer.json, or `deepseek_v3`.

Loading is `megatron_r1.data.tokenizer.load_tokenizer`'s job; this module adds the `deepseek_v3` name, which
resolves to the DeepSeek-V3/R1 tokenizer file (129,280 tokens incl. `<think>`) that ships inside the `litellm`
wheel — an optional extra, found without importing litellm (`pip install litellm`).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from megatron_r1.data.tokenizer import load_tokenizer as load_data_tokenizer
from megatron_r1.errors import UserError

DEEPSEEK_NAMES = ("deepseek_v3", "deepseek-v3", "deepseek_r1", "deepseek-r1")
_DEEPSEEK_RELPATH = Path("litellm_core_utils") / "tokenizers" / "deepseek_tokenizer.json"


def deepseek_v3_tokenizer_path() -> Path:
    """The DeepSeek-V3 tokenizer.json inside an installed litellm; UserError when litellm is not installed."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the deepseek_v3 tokenizer ships inside the optional `litellm` package: "
                        "pip install litellm (or pass --tokenizer DIR with a tokenizer.json)")
    for root in spec.submodule_search_locations:
        path = Path(root) / _DEEPSEEK_RELPATH
        if path.is_file():
            return path
    raise UserError(f"litellm is installed but has no {_DEEPSEEK_RELPATH} (its layout changed?); "
                    "pass --tokenizer with the path of a DeepSeek-V3 tokenizer.json")


def load_tokenizer(spec: str):
    """A tokenizer with encode/decode/vocab_size/eos_id/pad_id/bos_id for `spec` (see module docstring)."""
    if spec in DEEPSEEK_NAMES:
        spec = str(deepseek_v3_tokenizer_path())
    return load_data_tokenizer(spec)
