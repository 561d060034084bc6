"""Build a Megatron-Core GPTModel from our ModelConfig: the TransformerConfig, the layer spec, the model.

The model knows nothing about the training loop; parallelism comes from `megatron.core.parallel_state`, set up by
`megatron_r1.parallel` before this is called. `model.transformer_impl` picks the layer spec: Transformer Engine's
when TE is installed on a GPU (`auto`), local (pure torch) modules otherwise, or TE's layout from torch modules
(`te_standin`) — swapped through the spec, not through `if`s in the model.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_r1.config import ModelConfig, ParallelConfig, padded_vocab_size  # noqa: F401 (re-exported)
from megatron_r1.errors import ConfigError
from megatron_r1.models.positions import install_position_bridge
from megatron_r1.parallel import cpu_compat


def resolve_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


# ModelConfig / ParallelConfig fields that are TransformerConfig fields of the same name and meaning: passed as
# they are (the ones renamed or derived are spelt out in build_transformer_config).
_DENSE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "add_qkv_bias", "init_method_std",
                 # set for dense models too: mcore's default (allgather) rejects variable_seq_lengths
                 "moe_token_dispatcher_type")
_PARALLEL_FIELDS = ("pipeline_model_parallel_size", "num_layers_in_first_pipeline_stage",
                    "num_layers_in_last_pipeline_stage", "expert_model_parallel_size")
_MOE_FIELDS = ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size", "moe_router_topk",
               "moe_router_num_groups", "moe_router_group_topk", "moe_router_score_function",
               "moe_router_enable_expert_bias", "moe_router_bias_update_rate", "moe_router_topk_scaling_factor",
               "moe_aux_loss_coeff")

_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "rope_type",
               "rotary_base", "rotary_scaling_factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
               "mscale", "mscale_all_dim")


def _same_named(section, names: tuple[str, ...]) -> dict:
    return {name: getattr(section, name) for name in names}


def build_transformer_config(m: ModelConfig, p: ParallelConfig, precision: str = "auto"):
    """The Megatron TransformerConfig (MLATransformerConfig for DeepSeek-V3) for this model and layout."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    dtype = resolve_dtype(precision)
    tp = p.tensor_model_parallel_size
    sequence_parallel = p.sequence_parallel if p.sequence_parallel is not None else tp > 1
    on_gpu = torch.cuda.is_available()
    common = dict(
        **_same_named(m, _DENSE_FIELDS),
        **_same_named(p, _PARALLEL_FIELDS),
        layernorm_epsilon=m.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,  # SwiGLU everywhere (DeepSeek-V3, Llama, Qwen2)
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or tp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        variable_seq_lengths=True,  # RL batches have varying lengths across steps
        calculate_per_token_loss=False,
    )
    if m.num_experts:
        freq = [0] * m.first_k_dense_replace + [1] * (m.num_layers - m.first_k_dense_replace)
        common.update(
            **_same_named(m, _MOE_FIELDS),
            num_moe_experts=m.num_experts,
            moe_layer_freq=freq,
            moe_router_pre_softmax=False,
            moe_router_load_balancing_type="seq_aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
            moe_router_dtype="fp32",
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    if m.mtp_num_layers:
        common.update(mtp_num_layers=m.mtp_num_layers, mtp_loss_scaling_factor=m.mtp_loss_scaling_factor)
    if m.multi_latent_attention:
        return MLATransformerConfig(
            **common,
            **_same_named(m, _MLA_FIELDS),
            qk_layernorm=True,  # DeepSeek-V3 normalises the compressed q and kv latents
        )
    return TransformerConfig(**common)


def _replace_in_spec(spec, table: dict, seen=None):
    """Walk a ModuleSpec tree and swap module classes per `table` (the local fallbacks for TE-less runs)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if seen is None:
        seen = set()
    if id(spec) in seen:
        return spec
    seen.add(id(spec))
    if isinstance(spec, ModuleSpec):
        if spec.module in table:
            spec.module = table[spec.module]
        if spec.submodules is not None:
            _replace_in_spec(spec.submodules, table, seen)
        return spec
    if dataclasses.is_dataclass(spec):
        for f in dataclasses.fields(spec):
            val = getattr(spec, f.name)
            if isinstance(val, type) and val in table:
                setattr(spec, f.name, table[val])
            elif isinstance(val, (list, tuple)):
                new = [table.get(v, v) if isinstance(v, type) else _replace_in_spec(v, table, seen) for v in val]
                setattr(spec, f.name, type(val)(new))
            elif val is not None and not isinstance(val, type):
                _replace_in_spec(val, table, seen)
    return spec


def _use_duplicated_mla_down_projections(block) -> None:
    """MLA's q/kv down projections as replicated (duplicated) linears, as Transformer Engine's spec does.

    Why: with Megatron-Core 0.16.1's local spec they are ColumnParallelLinear; their output is all-gathered over TP
    and the rope key taken from it, but each TP rank back-propagates only its own heads' share of the rope key's
    gradient and nothing sums the shares, so every gradient below attention is wrong at TP > 1 (found by
    tests/parallel/test_parity.py). Replicated projections on sequence-parallel input take MLA's other branch,
    whose gather reduce-scatters the gradient, and their weights' gradients are all-reduced over TP as
    sequence-parallel parameters. Checkpoints are unchanged: the global tensors are the same.
    """
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "Linear", None) is None:  # only bound when its TE-guarded import block succeeded
        mla.Linear = Linear
    for layer_spec in block.layer_specs:
        attn = layer_spec.submodules.self_attention.submodules
        attn.linear_q_down_proj = mla.Linear
        attn.linear_kv_down_proj = mla.Linear


def _init_duplicated_linears(model, std: float) -> None:
    """Megatron's `Linear` keeps torch's default init; give it the model's init (same on every TP rank: the
    default generator is seeded alike on all of them, unlike the model-parallel stream)."""
    from megatron.core.post_training.modelopt.layers import Linear

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine", "te_standin")


def resolve_transformer_impl(m: Optional[ModelConfig] = None) -> str:
    """The spec `model.transformer_impl` selects: `local`, `transformer_engine` or `te_standin`.

    `auto` (the default) is Transformer Engine when it imports and a GPU is present, the local spec otherwise.
    `transformer_engine` insists (a clear ConfigError when TE is missing); `te_standin` is TE's layout built from
    torch modules (`megatron_r1.models.te_standin`), which runs anywhere.
    """
    impl = "auto" if m is None else getattr(m, "transformer_impl", "auto")
    if impl not in TRANSFORMER_IMPLS:
        raise ConfigError(f"model.transformer_impl: unknown implementation {impl!r} "
                          f"(choose from {', '.join(TRANSFORMER_IMPLS)})")
    te = cpu_compat.te_available()
    if impl == "auto":
        return "transformer_engine" if te and torch.cuda.is_available() else "local"
    if impl == "transformer_engine" and not (te and torch.cuda.is_available()):
        why = "Transformer Engine does not import here" if not te else "no GPU is present"
        raise ConfigError(f"model.transformer_impl=transformer_engine: {why}; install the GPU extra on a CUDA "
                          "machine (pip install -e '.[gpu]', see README) or set model.transformer_impl=local "
                          "(torch modules) or te_standin (TE's parameter layout with torch modules)")
    return impl


def uses_transformer_engine(m: Optional[ModelConfig] = None) -> bool:
    """Whether `build_model` picks Transformer Engine's modules for `m` (no config: the `auto` choice, TE
    installed and a GPU present)."""
    return resolve_transformer_impl(m) == "transformer_engine"


def build_layer_spec(tconfig, impl: str = "local"):
    """Decoder block spec (and MTP block spec) for this config and implementation (`resolve_transformer_impl`)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_mtp_block_spec

    if impl == "te_standin":
        from megatron_r1.models.te_standin import standin_layer_spec

        return standin_layer_spec(tconfig)
    use_te = impl == "transformer_engine"
    block = get_gpt_decoder_block_spec(tconfig, use_transformer_engine=use_te, normalization="RMSNorm")
    table = {}
    if not use_te:
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megatron_r1.models.local_layers import RMSNorm, SDPACoreAttention

        table = {DotProductAttention: SDPACoreAttention, WrappedTorchNorm: RMSNorm}
        # Specs returned by Megatron are shared module-level objects: copy before editing.
        block = copy.deepcopy(block)
        if tconfig.multi_latent_attention:
            _use_duplicated_mla_down_projections(block)
        block = _replace_in_spec(block, table)
    mtp = None
    if tconfig.mtp_num_layers:
        # Built from the edited last layer, so the MTP layer gets the same local modules.
        mtp = get_gpt_mtp_block_spec(tconfig, block.layer_specs[-1], use_transformer_engine=use_te)
        if table:
            mtp = _replace_in_spec(copy.deepcopy(mtp), table)
    return block, mtp


def build_model(m: ModelConfig, p: ParallelConfig, precision: str = "auto", pre_process: Optional[bool] = None,
                post_process: Optional[bool] = None, vp_stage: Optional[int] = None):
    """This rank's part of the model (its pipeline stage, its TP/EP shards), on CPU or the current GPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    cpu_compat.install()
    impl = resolve_transformer_impl(m)
    tconfig = build_transformer_config(m, p, precision)
    block, mtp = build_layer_spec(tconfig, impl)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=True) if ps.is_initialized() else True
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=True) if ps.is_initialized() else True
    if mtp is not None and not post_process:
        mtp = None  # the MTP block lives on the last pipeline stage
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block,
        vocab_size=m.padded_vocab_size(p.tensor_model_parallel_size),
        max_sequence_length=m.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=not m.untie_embeddings_and_output_weights,
        # MLA builds its own (YaRN) rotary embedding inside attention; dense models use plain RoPE.
        position_embedding_type="none" if m.multi_latent_attention else "rope",
        rotary_base=int(m.rotary_base),
        mtp_block_spec=mtp,
        vp_stage=vp_stage,
    )
    _mark_expert_params_for_expert_dp(model, tconfig)
    _init_duplicated_linears(model, m.init_method_std)
    install_position_bridge(model)  # rotary embeddings at given position ids, inside `rotary_positions` only
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def _mark_expert_params_for_expert_dp(model, tconfig) -> None:
    """Route routed-expert gradients to the expert data-parallel all-reduce whenever that group differs from DP.

    Megatron-Core 0.16.1 marks expert weights `allreduce=False` (-> DDP's expert buffers, reduced over the
    expert-DP group) only when EP > 1. With TP > 1, expert TP = 1 and EP = 1 every TP rank runs full expert copies
    on its own sequence-parallel tokens, so the expert grads must also be summed over the TP ranks; left in the
    dense buffers (reduced over DP only) each TP rank keeps its partial gradient and the replicas drift apart
    (caught by tests/parallel/test_parity.py).
    """
    if not tconfig.num_moe_experts or tconfig.expert_model_parallel_size > 1:
        return
    tp = tconfig.tensor_model_parallel_size
    if (tconfig.expert_tensor_parallel_size or tp) == tp:
        return
    for name, param in model.named_parameters():
        if ".experts." in name and ".shared_experts." not in name:
            param.allreduce = False
