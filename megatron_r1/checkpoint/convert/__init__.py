"""HF <-> Megatron checkpoint conversion (DeepSeek-V3, Qwen2, Llama): files, in-memory loading, the CLI.

Public API:
    convert_hf_to_mcore(load, save, model=None, tp=1, pp=1, ep=1, force=False)   HF dir -> Megatron checkpoint
    convert_mcore_to_hf(load, save, model=None, max_shard_size="5GB", force=False)  and back
    model_config_from_hf(hf_config_dict) -> (ModelConfig, HFOptions)            config translation
    HFCheckpoint(dir)                                                            lazy safetensors reader
    load_hf_into_model(model, HFCheckpoint, model_cfg, opts)                     HF weights into a built model
                                                                                 (this rank's shard, any layout)
    iter_hf_tensors(model, model_cfg, opts)                                      a TP=1 model as HF tensors
    load_mcore_model(dir)                                                        a Megatron checkpoint at TP=1
"""
from megatron_r1.checkpoint.convert.convert import (
    atomic_output,
    convert_hf_to_mcore,
    convert_mcore_to_hf,
    load_mcore_model,
    resolve_mcore_dir,
)
from megatron_r1.checkpoint.convert.hf_config import hf_config_from_model, model_config_from_hf
from megatron_r1.checkpoint.convert.hf_io import HFCheckpoint
from megatron_r1.checkpoint.convert.mapping import HFOptions, build_rules
from megatron_r1.checkpoint.convert.weights import iter_hf_tensors, load_hf_into_model

__all__ = [
    "HFCheckpoint", "HFOptions", "atomic_output", "build_rules", "convert_hf_to_mcore", "convert_mcore_to_hf",
    "hf_config_from_model", "iter_hf_tensors", "load_hf_into_model", "load_mcore_model", "model_config_from_hf",
    "resolve_mcore_dir",
]
