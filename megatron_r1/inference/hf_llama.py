"""A Megatron Llama/Qwen2-shaped GPTModel as the equivalent HF `LlamaForCausalLM` / `Qwen2ForCausalLM` (same
weights, in memory): the reference for the logit-parity test and the baseline of tools/bench_generation.py.

Deliberately minimal (TP = 1, dense models); full converters live in megatron_r1.checkpoint.convert.
"""
from __future__ import annotations

import torch

from megatron_r1.models.unwrap import unwrap


def to_hf(model):
    """An HF causal LM (eval mode, same dtype) holding copies of `model`'s weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    model = unwrap(model)
    cfg = model.config
    if getattr(cfg, "multi_latent_attention", False) or cfg.num_moe_experts:
        raise ValueError("to_hf maps dense Llama/Qwen2 models only")
    nh, ng = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    hd = cfg.kv_channels
    g = nh // ng
    qkv_bias = bool(cfg.add_qkv_bias)
    common = dict(vocab_size=model.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=nh, num_key_value_heads=ng,
                  rms_norm_eps=cfg.layernorm_epsilon, max_position_embeddings=model.max_sequence_length,
                  tie_word_embeddings=model.share_embeddings_and_output_weights, torch_dtype=cfg.params_dtype)
    if qkv_bias:
        hf_cfg = Qwen2Config(**common)
        cls = Qwen2ForCausalLM
    else:
        hf_cfg = LlamaConfig(**common, head_dim=hd, attention_bias=False, mlp_bias=False)
        cls = LlamaForCausalLM
    # RoPE base: recover it from Megatron's inv_freq (inv_freq[1] = base^(-2/hd)).
    inv = model.rotary_pos_emb.inv_freq.double()
    theta = float(f"{float(inv[1] ** (-hd / 2.0)):.6g}")  # fp32 inv_freq: 9999.998 -> 10000
    hf_cfg.rope_theta = theta
    if getattr(hf_cfg, "rope_parameters", None) is not None:
        hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    hf = cls(hf_cfg).to(cfg.params_dtype).eval()
    sd = {"model.embed_tokens.weight": model.embedding.word_embeddings.weight,
          "model.norm.weight": model.decoder.final_layernorm.weight}
    if not model.share_embeddings_and_output_weights:
        sd["lm_head.weight"] = model.output_layer.weight
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}."
        att = layer.self_attention
        w = att.linear_qkv.weight.view(ng, (g + 2) * hd, cfg.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = w[:, :g * hd].reshape(nh * hd, -1)
        sd[p + "self_attn.k_proj.weight"] = w[:, g * hd:(g + 1) * hd].reshape(ng * hd, -1)
        sd[p + "self_attn.v_proj.weight"] = w[:, (g + 1) * hd:].reshape(ng * hd, -1)
        if qkv_bias:
            b = att.linear_qkv.bias.view(ng, (g + 2) * hd)
            sd[p + "self_attn.q_proj.bias"] = b[:, :g * hd].reshape(-1)
            sd[p + "self_attn.k_proj.bias"] = b[:, g * hd:(g + 1) * hd].reshape(-1)
            sd[p + "self_attn.v_proj.bias"] = b[:, (g + 1) * hd:].reshape(-1)
        sd[p + "self_attn.o_proj.weight"] = att.linear_proj.weight
        sd[p + "input_layernorm.weight"] = layer.input_layernorm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.pre_mlp_layernorm.weight
        gate, up = layer.mlp.linear_fc1.weight.chunk(2, dim=0)
        sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = gate, up
        sd[p + "mlp.down_proj.weight"] = layer.mlp.linear_fc2.weight
    with torch.no_grad():
        missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"to_hf: missing {missing}, unexpected {unexpected}")
    if hf_cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf
