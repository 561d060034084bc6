"""Transformer Engine's module layout, built from torch modules: the TE spec's structure where TE cannot import.

Why: with TE installed, Megatron's TE spec fuses each pre-block norm into the linear that follows it
(`TELayerNormColumnParallelLinear`, norm weight `layer_norm_weight`) and leaves `input_layernorm` /
`pre_mlp_layernorm` (MLA: `q_layernorm` / `kv_layernorm`) as `IdentityOp`; MoE layers keep a separate
`pre_mlp_layernorm` (TENorm), MLA's down projections are duplicated `TELinear`s. Code that reads a model (the
generator, weight refit, checkpoint conversion) must handle that layout, and TE does not import on a CPU. This
module builds the very spec Megatron's `get_gpt_decoder_block_spec(use_transformer_engine=True)` returns, with
each TE class replaced by a CPU module that has its parameter names and its arithmetic:

    TELayerNormColumnParallelLinear -> LayerNormColumnParallelLinear (below: RMSNorm + ColumnParallelLinear)
    TENorm                          -> local_layers.RMSNorm
    TELinear (duplicated)           -> megatron.core.post_training.modelopt.layers.Linear
    TEColumn/RowParallelLinear      -> ColumnParallelLinear / RowParallelLinear
    TEDotProductAttention           -> local_layers.SDPACoreAttention

Selected with `model.transformer_impl=te_standin`; trains like any other spec (it is Megatron's spec code that
decides the layout, only the leaf classes are swapped), and tests compare it with the local spec.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from megatron.core.models.backends import BackendSpecProvider
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules

from megatron_r1.errors import ConfigError
from megatron_r1.models.local_layers import RMSNorm, SDPACoreAttention, rms_norm


class LayerNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm then a column-parallel linear in one module, with TE's parameter names (`layer_norm_weight`,
    `weight`, `bias`): the CPU stand-in for `TELayerNormColumnParallelLinear`.

    The norm runs on this rank's (sequence-parallel) rows before the linear's all-gather, as TE's does; its
    weight carries `sequence_parallel` so Megatron all-reduces its gradient across TP ranks. Constructor
    arguments and refusals follow TE's wrapper (no gather_output, no experts)."""

    def __init__(self, input_size: int, output_size: int, *, config, init_method, gather_output: bool, bias: bool,
                 skip_bias_add: bool, is_expert: bool, skip_weight_param_allocation: bool = False,
                 tp_comm_buffer_name: Optional[str] = None, tp_group=None, stride: int = 1):
        if gather_output:
            raise ValueError("LayerNormColumnParallelLinear: gather_output=True is not supported (as in TE)")
        if is_expert:
            raise ValueError("LayerNormColumnParallelLinear: not for MoE experts (as in TE)")
        if config.normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ConfigError("model.transformer_impl=te_standin: only RMSNorm without zero-centred weights "
                              f"(normalization={config.normalization!r})")
        super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                         gather_output=False, stride=stride, skip_bias_add=skip_bias_add,
                         skip_weight_param_allocation=skip_weight_param_allocation, is_expert=False,
                         tp_comm_buffer_name=tp_comm_buffer_name, tp_group=tp_group)
        self.normalization = "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.zero_centered_gamma = False
        self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size, dtype=config.params_dtype))
        self.layer_norm_weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, input_: torch.Tensor, weight: Optional[torch.Tensor] = None,
                runtime_gather_output: Optional[bool] = None):
        return super().forward(rms_norm(input_, self.layer_norm_weight, self.eps), weight, runtime_gather_output)


class StandinSpecProvider(BackendSpecProvider):
    """Megatron's TESpecProvider with the CPU modules above in place of TE's."""

    def linear(self) -> type:
        from megatron.core.post_training.modelopt.layers import Linear

        return Linear

    def column_parallel_linear(self) -> type:
        return ColumnParallelLinear

    def row_parallel_linear(self) -> type:
        return RowParallelLinear

    def fuse_layernorm_and_linear(self) -> bool:
        return True

    def column_parallel_layer_norm_linear(self) -> Optional[type]:
        return LayerNormColumnParallelLinear

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False) -> type:
        return RMSNorm

    def core_attention(self) -> type:
        return SDPACoreAttention

    def grouped_mlp_modules(self, moe_use_grouped_gemm: bool,
                            moe_use_legacy_grouped_gemm: bool) -> Tuple[type, Optional[MLPSubmodules]]:
        from megatron.core.transformer.moe.experts import SequentialMLP

        if moe_use_grouped_gemm:
            raise ConfigError("model.transformer_impl=te_standin: grouped-GEMM experts need Transformer Engine")
        return SequentialMLP, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)

    def activation_func(self) -> type:
        return None


@contextlib.contextmanager
def _te_names_bound_to_standins():
    """Megatron's layer-spec module instantiates `TESpecProvider()` and reads `TENorm` from its globals (bound
    only when TE imported): bind them to the stand-ins while its TE spec functions run, restore them after.
    MLA picks its down projections' arguments by comparing classes with `Linear`, which it binds only when TE
    imports: bind it too (the local spec's MLA fix in builder.py does the same)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.post_training.modelopt.layers import Linear
    from megatron.core.transformer import multi_latent_attention as mla

    if getattr(mla, "Linear", None) is None:
        mla.Linear = Linear
    missing = object()
    saved = {name: getattr(specs, name, missing) for name in ("TESpecProvider", "TENorm")}
    specs.TESpecProvider, specs.TENorm = StandinSpecProvider, RMSNorm
    try:
        yield specs
    finally:
        for name, value in saved.items():
            if value is missing:
                delattr(specs, name)
            else:
                setattr(specs, name, value)


def standin_layer_spec(tconfig):
    """(decoder block spec, MTP block spec or None): Megatron's Transformer Engine specs for `tconfig`, each TE
    class swapped for its CPU stand-in."""
    if tconfig.moe_grouped_gemm or getattr(tconfig, "use_te_activation_func", False):
        raise ConfigError("model.transformer_impl=te_standin: grouped GEMM and TE activation ops need TE")
    with _te_names_bound_to_standins() as specs:
        block = specs.get_gpt_decoder_block_spec(tconfig, use_transformer_engine=True, normalization="RMSNorm")
        mtp = None
        if tconfig.mtp_num_layers:
            mtp = specs.get_gpt_mtp_block_spec(tconfig, block.layer_specs[-1], use_transformer_engine=True)
    return block, mtp
