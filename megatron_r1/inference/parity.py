"""The generator's parity contract, as one table: every field of Megatron-Core's TransformerConfig (with
MLATransformerConfig's and ModelParallelConfig's) and every module type, and what the generator does with it.

The generator (`functional.py`, and on CPU the fused step of `csrc/cpu_decode.cpp`) computes the transformer again
instead of running Megatron's forward; that is why rollouts are fast, and why it must compute exactly what the
trainer computes. Each config field is one of:

- READ: the generator reads it (or runs the Megatron module that does) and reproduces any value: shapes, eps,
  rope tables, router top-k and groups, the parallel layout (tested against one process in tests/inference/).
- ONLY: changes what the model computes; reproduced at the values the rule accepts, refused otherwise by
  `check_config` at engine construction with a ConfigError naming the field.
- NOT_FORWARD: cannot change what the model computes in eval mode: training only (dropout, losses, init,
  recompute), kernels and communication that compute the same arithmetic, logging, or options of a feature that
  an ONLY rule already refuses.

tests/inference/test_parity_contract.py iterates this table: every field of the installed Megatron-Core is in
exactly one group (an upgrade that adds a field fails CI until someone decides which), every ONLY rule refuses a
value outside it, and every module type the builder produces is one the weight reader (`layer_adapter.py`) takes.
Adding a model feature: docs/architecture.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn.functional as F

from megatron_r1.errors import ConfigError


@dataclass(frozen=True)
class Only:
    """A field reproduced only at the values `accepts` allows (when `applies` to the model; always by default)."""

    accepts: Callable[[Any], bool]
    reproduced: str  # what the generator implements, for the error message
    refused_example: Any  # a value the rule refuses (the contract test sets it)
    applies: Optional[Callable[[Any], bool]] = None  # cfg -> whether the rule is in force for this model


def _off(v) -> bool:
    return not v


def _none(v) -> bool:
    return v is None


def _mla(cfg) -> bool:
    return bool(getattr(cfg, "multi_latent_attention", False))


def _moe(cfg) -> bool:
    return bool(getattr(cfg, "num_moe_experts", None))


READ: dict[str, str] = {
    # shapes
    "num_layers": "layer count", "hidden_size": "width", "num_attention_heads": "heads",
    "num_query_groups": "grouped-query KV heads", "ffn_hidden_size": "MLP width", "kv_channels": "head dim",
    "add_qkv_bias": "the QKV bias (Qwen2)", "layernorm_epsilon": "RMSNorm eps",
    "multi_latent_attention": "MLA (DeepSeek-V3)", "q_lora_rank": "MLA q compression",
    "kv_lora_rank": "MLA kv latent", "qk_head_dim": "MLA nope dims", "qk_pos_emb_head_dim": "MLA rope dims",
    "v_head_dim": "MLA value dims",
    # rope tables come from the model's own rotary module
    "rotary_base": "rope base", "rotary_scaling_factor": "YaRN factor",
    "original_max_position_embeddings": "YaRN", "beta_fast": "YaRN", "beta_slow": "YaRN", "mscale": "YaRN",
    "mscale_all_dim": "YaRN",
    # MoE
    "num_moe_experts": "experts", "moe_layer_freq": "dense/MoE layer pattern", "moe_ffn_hidden_size": "expert width",
    "moe_shared_expert_intermediate_size": "shared experts", "moe_router_topk": "top-k",
    "moe_router_num_groups": "group-limited routing", "moe_router_group_topk": "group-limited routing",
    "moe_router_pre_softmax": "softmax before top-k", "moe_router_topk_scaling_factor": "routed scaling",
    "moe_router_enable_expert_bias": "the balancing bias in the top-k choice",
    # MTP heads add a training loss; the main head's logits, which generation samples from, do not depend on them
    "mtp_num_layers": "MTP (ignored by the main head)",
    # precision: the generator computes in the parameters' dtype
    "params_dtype": "dtype", "bf16": "dtype", "fp16": "dtype",
    # layout: each is tested against one process (tests/inference/test_parallel.py, test_pipeline_parallel.py)
    "tensor_model_parallel_size": "TP", "pipeline_model_parallel_size": "PP", "expert_model_parallel_size": "EP",
    "expert_tensor_parallel_size": "expert TP", "sequence_parallel": "same weights, full sequence per rank",
    "num_layers_in_first_pipeline_stage": "uneven PP", "num_layers_in_last_pipeline_stage": "uneven PP",
}

ONLY: dict[str, Only] = {
    "normalization": Only(lambda v: v == "RMSNorm", "RMSNorm", "LayerNorm"),
    "layernorm_zero_centered_gamma": Only(_off, "plain norm weights", True),
    "gated_linear_unit": Only(lambda v: v is True, "SwiGLU (gated)", False),
    "activation_func": Only(lambda v: v is F.silu, "SwiGLU (silu)", F.gelu),
    "glu_linear_offset": Only(_off, "no GLU offset", 1.0),
    "activation_func_clamp_value": Only(_none, "no activation clamp", 7.0),
    "use_te_activation_func": Only(_off, "torch's silu", True),
    "add_bias_linear": Only(_off, "linears without bias (QKV bias: add_qkv_bias)", True),
    "fp32_residual_connection": Only(_off, "the residual in the parameters' dtype", True),
    "apply_residual_connection_post_layernorm": Only(_off, "pre-norm residuals", True),
    "rotary_interleaved": Only(_off, "Megatron's default rope layout", True),
    "window_size": Only(_none, "full causal attention", (128, 0)),
    "window_attn_skip_freq": Only(_none, "full causal attention", 2),
    "softmax_type": Only(lambda v: v in (None, "vanilla"), "vanilla softmax", "off-by-one"),
    "softmax_scale": Only(_none, "1/sqrt(head_dim) (MLA: its own scale)", 0.5, applies=lambda c: not _mla(c)),
    "qk_layernorm": Only(_off, "no query/key norms in dense attention (MLA's latent norms are read)", True,
                         applies=lambda c: not _mla(c)),
    "qk_l2_norm": Only(_off, "no query/key L2 norm", True),
    "attention_output_gate": Only(_off, "no attention output gate", True),
    "no_rope_freq": Only(_none, "rope on every layer", 4),
    "experimental_attention_variant": Only(_none, "standard attention", "dsa"),
    "linear_attention_freq": Only(_none, "no linear-attention layers", 4),
    "mrope_section": Only(_none, "1-D rope", [16, 24, 24]),
    "is_hybrid_model": Only(_off, "a pure transformer", True),
    "heterogeneous_block_specs": Only(_off, "identical layer specs", True),
    "rope_type": Only(lambda v: v in ("rope", "yarn"), "rope and yarn", "mrope", applies=_mla),
    "rotary_percent": Only(lambda v: v == 1.0, "rope on all of MLA's rope dims", 0.5, applies=_mla),
    "fp8": Only(_none, "no FP8 (the trainer's FP8 GEMMs would differ)", "e4m3"),
    "fp4": Only(_none, "no FP4", "nvfp4"),
    "use_kitchen": Only(_off, "no kitchen quantisation", True),
    "quant_recipe": Only(_none, "no quantisation recipe", "recipe"),
    "enable_autocast": Only(_off, "no autocast (the parameters' dtype)", True),
    "moe_router_score_function": Only(lambda v: v in ("sigmoid", "softmax"), "sigmoid and softmax scores",
                                      "sparsemixer", applies=_moe),
    "moe_router_dtype": Only(lambda v: v in (None, "fp32", "fp64"), "router logits in fp32/fp64 or the params'",
                             "bf16", applies=_moe),
    "moe_router_load_balancing_type": Only(lambda v: "sinkhorn" not in (v if isinstance(v, list) else [v]),
                                           "aux-loss balancing (sinkhorn routes differently)", "sinkhorn",
                                           applies=_moe),
    "moe_router_topk_limited_devices": Only(_none, "routing not limited by device", 2),
    "moe_router_padding_for_quantization": Only(_off, "an unpadded routing map", True),
    "moe_router_padding_for_fp8": Only(_off, "an unpadded routing map", True),
    "moe_router_force_load_balancing": Only(_off, "learned routing", True),
    "moe_enable_routing_replay": Only(_off, "Megatron's routing (replay: rl.router_replay, models/router_replay.py)",
                                      True),
    "moe_input_jitter_eps": Only(_none, "no router input jitter", 0.01),
    "moe_expert_capacity_factor": Only(_none, "dropless experts", 1.0),
    "moe_token_dropping": Only(_off, "dropless experts", True),
    "moe_pad_expert_input_to_capacity": Only(_off, "dropless experts", True),
    "moe_shared_expert_gate": Only(_off, "ungated shared experts", True),
    "moe_apply_probs_on_input": Only(_off, "probabilities on the experts' outputs", True),
    "moe_latent_size": Only(_none, "experts on the full hidden size", 64),
    "moe_grouped_gemm": Only(_off, "SequentialMLP experts", True),
    "moe_extended_tp": Only(_off, "experts split by EP and expert TP", True),
    "context_parallel_size": Only(lambda v: v == 1, "no context parallelism", 2),
    "hierarchical_context_parallel_sizes": Only(_none, "no context parallelism", [2, 2]),
    "hybrid_context_parallel": Only(_off, "no context parallelism", True),
    "virtual_pipeline_model_parallel_size": Only(_none, "one model chunk per stage", 2),
    "pipeline_model_parallel_layout": Only(_none, "Megatron's even/uneven stage split", "Et|tL"),
    "account_for_embedding_in_pipeline_split": Only(_off, "the standard stage split", True),
    "account_for_loss_in_pipeline_split": Only(_off, "the standard stage split", True),
}

NOT_FORWARD: dict[str, tuple[str, ...]] = {k: tuple(v.split()) for k, v in {
    "training only": """
        hidden_dropout attention_dropout calculate_per_token_loss mtp_loss_scaling_factor moe_aux_loss_coeff
        moe_z_loss_coeff moe_router_bias_update_rate moe_token_drop_policy qk_clip qk_clip_alpha
        qk_clip_threshold init_method output_layer_init_method init_method_std embedding_init_method
        embedding_init_method_std init_model_with_meta_device perform_initialization use_cpu_initialization
        recompute_granularity recompute_method recompute_num_layers distribute_saved_activations
        recompute_modules moe_layer_recompute num_microbatches_with_partial_activation_checkpoints
        gradient_accumulation_fusion cross_entropy_loss_fusion cross_entropy_fusion_impl delay_wgrad_compute
        defer_embedding_wgrad_compute wgrad_deferral_limit finalize_model_grads_func grad_scale_func
        no_sync_func grad_sync_func param_sync_func use_te_rng_tracker activation_func_fp8_input_store
        fine_grained_activation_offloading offload_modules min_offloaded_tensor_size cpu_offloading
        cpu_offloading_num_layers _cpu_offloading_context cpu_offloading_activations cpu_offloading_weights
        cpu_offloading_double_buffering clone_scatter_output_in_embedding mtp_standalone
        """,
    "same arithmetic, other kernel or numerics": """
        attention_backend apply_query_key_layer_scaling attention_softmax_in_fp32
        disable_bf16_reduced_precision_matmul bias_activation_fusion masked_softmax_fusion persist_layer_norm
        memory_efficient_layer_norm bias_dropout_fusion apply_rope_fusion fused_single_qkv_rope
        moe_permute_fusion moe_router_fusion deterministic_mode batch_invariant_mode
        disable_parameter_transpose_cache mlp_chunks_for_prefill enable_cuda_graph cuda_graph_use_single_mempool
        cuda_graph_retain_backward_graph cuda_graph_warmup_steps external_cuda_graph cuda_graph_impl
        cuda_graph_scope transformer_impl
        """,
    "communication and schedule": """
        pipeline_model_parallel_comm_backend pipeline_dtype variable_seq_lengths overlap_p2p_comm batch_p2p_comm
        batch_p2p_sync use_ring_exchange_p2p deallocate_pipeline_outputs overlap_p2p_comm_warmup_flush
        microbatch_group_size_per_vp_stage async_tensor_model_parallel_allreduce tp_comm_overlap
        tp_comm_bulk_wgrad tp_comm_bulk_dgrad tp_comm_overlap_ag tp_comm_overlap_rs tp_comm_overlap_rs_dgrad
        tp_comm_split_ag tp_comm_atomic_ag tp_comm_split_rs tp_comm_atomic_rs tp_comm_overlap_disable_qkv
        tp_comm_overlap_disable_fc1 tp_comm_bootstrap_backend overlap_moe_expert_parallel_comm
        ep_overlap_early_attn_memory_release moe_token_dispatcher_type moe_enable_deepep
        moe_flex_dispatcher_backend moe_deepep_num_sms moe_hybridep_num_sms moe_shared_expert_overlap
        moe_use_legacy_grouped_gemm symmetric_ar_type
        """,
    "bookkeeping and logging": """
        timers barrier_with_L1_time test_mode config_logger_dir log_max_attention_logit moe_per_layer_logging
        hetereogenous_dist_checkpoint
        """,
    "Megatron's own inference engine": """
        flash_decode inference_rng_tracker inference_sampling_seed use_inference_optimized_layers
        inference_fuse_tp_communication cache_mla_latents
        """,
    "options of a feature an ONLY rule refuses": """
        fp8_recipe fp8_param fp8_quantizer_factory fp8_margin fp8_interval fp8_amax_history_len
        fp8_amax_compute_algo fp8_wgrad fp8_dot_product_attention fp8_multi_head_attention tp_only_amax_red
        first_last_layers_bf16 num_layers_at_start_in_bf16 num_layers_at_end_in_bf16 fp4_recipe fp4_param
        fp4_quantizer_factory use_kitchen_attention kitchen_attention_backend autocast_dtype cp_comm_type
        max_seqlen_per_dp_cp_rank dsa_indexer_n_heads dsa_indexer_head_dim dsa_indexer_topk
        dsa_indexer_loss_coeff dsa_indexer_use_sparse_loss linear_conv_kernel_dim linear_key_head_dim
        linear_value_head_dim linear_num_key_heads linear_num_value_heads mamba_state_dim mamba_head_dim
        mamba_num_groups mamba_num_heads use_mamba_mem_eff_path use_fused_weighted_squared_relu
        """,
}.items()}
# (transformer_impl picks the spec; the module types it produces are checked against MODULES below)

# Module types the weight reader (layer_adapter.py) takes, by slot; anything else is refused naming its path.
# Linears are read through their `weight` (and TE's fused `layer_norm_weight`), whatever their class.
MODULES: dict[str, tuple[str, ...]] = {
    "layer": ("TransformerLayer",),
    "self_attention": ("SelfAttention", "MLASelfAttention"),
    "norm": ("RMSNorm", "IdentityOp"),
    "mlp": ("MLP", "SharedExpertMLP"),
    "moe": ("MoELayer",),
    "experts": ("SequentialMLP",),
    "cross_attention": ("IdentityOp",),
}


def _refuse(field: str, why: str):
    raise ConfigError(f"inference: {field}: {why}; the generator does not reproduce it (it would sample from "
                      f"log-probs other than the trainer's)")


def check_config(cfg) -> None:
    """Every ONLY rule in force for `cfg`: a value the generator does not reproduce is a ConfigError naming the
    field and what is implemented. Fields a Megatron version lacks are skipped (getattr default)."""
    for name, rule in ONLY.items():
        if rule.applies is not None and not rule.applies(cfg):
            continue
        if not hasattr(cfg, name):
            continue
        value = getattr(cfg, name)
        if not rule.accepts(value):
            shown = getattr(value, "__name__", None) or repr(value)
            _refuse(name, f"set to {shown} (implemented: {rule.reproduced})")


def require_module(mod, slot: str, where: str) -> str:
    """The module's type name if the reader takes it in `slot`, else a ConfigError naming the module path."""
    kind = type(mod).__name__
    if kind not in MODULES[slot]:
        raise ConfigError(f"inference: {where}: {kind} is not implemented ({' and '.join(MODULES[slot])} "
                          "are): the generator would compute other log-probs than the model")
    return kind
