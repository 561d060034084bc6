"""Exact parameter counts of a ModelConfig, whole-model and per GPU, without building the model.

Counts follow the modules Megatron-Core 0.16.1 builds for our specs (models/builder.py): RMSNorm weights, no linear
biases except Qwen2's QKV bias, SwiGLU MLPs (fc1 is [2·ffn, h]), MLA with q/kv layernorms, routed experts + one
shared expert (no shared-expert gate), a bias-free router. The router's expert bias is a buffer in Megatron (updated
by the balancing rule, not by the optimizer), so it is counted apart (`expert_bias`), never in `trainable`.

Per-GPU shards: MLA's down projections are duplicated over TP in both specs (TE's `TELinear` with
parallel_mode="duplicated"; the local spec uses Megatron's replicated `Linear`, see models/builder.py for why), which
the tests compare with real Megatron shards. It matters: for DeepSeek-V3 at TP 8 the duplicated down projections are
0.82B of the 4.49B parameters on each GPU of the examples' layout.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_r1.config import ModelConfig, ParallelConfig


# ----------------------------------------------------------------------------------------------- one layer
def attention_params(m: ModelConfig) -> int:
    """Self-attention of one layer including its input RMSNorm."""
    h, n = m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank:
            q = h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * n * q_head  # down, q_layernorm, up
        else:
            q = h * n * q_head
        kv = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank  # down (latent + shared rope key), norm
        kv += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim)  # up: per-head nope keys and values
        out = n * m.v_head_dim * h
        return h + q + kv + out
    d = m.kv_channels or h // n
    g = m.num_query_groups or n
    qkv = (n + 2 * g) * d
    return h + h * qkv + (qkv if m.add_qkv_bias else 0) + n * d * h


def dense_mlp_params(m: ModelConfig) -> int:
    """SwiGLU MLP (gate, up, down) with its pre-MLP RMSNorm."""
    return m.hidden_size + 3 * m.hidden_size * m.ffn_hidden_size


def expert_params(m: ModelConfig) -> int:
    """One routed expert (SwiGLU)."""
    return 3 * m.hidden_size * m.moe_ffn_hidden_size


def shared_expert_params(m: ModelConfig) -> int:
    return 3 * m.hidden_size * (m.moe_shared_expert_intermediate_size or 0)


def router_params(m: ModelConfig) -> int:
    return (m.num_experts or 0) * m.hidden_size


def is_moe_layer(m: ModelConfig, index: int) -> bool:
    return bool(m.num_experts) and index >= m.first_k_dense_replace


def layer_params(m: ModelConfig, index: int) -> "Split":
    """Parameters of decoder layer `index` (0-based), split into routed-expert and other parameters."""
    if is_moe_layer(m, index):
        dense = attention_params(m) + m.hidden_size + router_params(m) + shared_expert_params(m)
        return Split(dense=dense, expert=m.num_experts * expert_params(m))
    return Split(dense=attention_params(m) + dense_mlp_params(m), expert=0)


def mtp_extra_params(m: ModelConfig) -> int:
    """An MTP module minus its transformer layer: enorm, hnorm, eh_proj [h, 2h], final norm. Embedding and output
    head are shared with the main model (in Megatron and in the DeepSeek-V3 paper)."""
    h = m.hidden_size
    return 3 * h + 2 * h * h


@dataclass(frozen=True)
class Split:
    """Parameters split by how they are sharded and data-parallel-reduced: routed experts vs everything else."""

    dense: int = 0
    expert: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: "Split") -> "Split":
        return Split(self.dense + other.dense, self.expert + other.expert)

    def __mul__(self, k: int) -> "Split":
        return Split(self.dense * k, self.expert * k)


# ----------------------------------------------------------------------------------------------- whole model
@dataclass(frozen=True)
class ParamCount:
    """Whole-model counts. `main` is the model without MTP: DeepSeek-V3's "671B"."""

    embedding: int
    output: int  # 0 when tied to the embedding
    decoder: Split  # all decoder layers + final norm
    mtp: Split  # MTP modules (their own layers, norms, projections; not the shared embedding/head)
    expert_bias: int  # router bias buffers (main + MTP); not trainable
    active_per_token: int  # main model: everything but the routed experts, plus top-k of them per MoE layer
    mtp_layers: int = 0

    @property
    def main(self) -> int:
        return self.embedding + self.output + self.decoder.total

    @property
    def trainable(self) -> int:
        """Main model + MTP: what the optimizer holds (Megatron's exact count when counted with `padded=True`)."""
        return self.main + self.mtp.total

    @property
    def hf_checkpoint(self) -> int:
        """DeepSeek's HF checkpoint stores each MTP layer with its own copies of the embedding and output head, and the
        router biases (`e_score_correction_bias`): the "685B = 671B + 14B MTP" figure."""
        return self.trainable + self.expert_bias + self.mtp_layers * 2 * self.embedding


def count_params(m: ModelConfig, padded: bool = False) -> ParamCount:
    """Exact parameter counts for model `m` (see module docstring for what Megatron builds). `padded`: embedding and
    output rows as the builder pads them (`ModelConfig.padded_vocab_size`), i.e. what Megatron instantiates; the
    default counts the tokenizer's vocab, as published figures do."""
    h = m.hidden_size
    v = m.padded_vocab_size() if padded else m.vocab_size
    decoder = Split(dense=h)  # final RMSNorm
    active = v * h + (0 if not m.untie_embeddings_and_output_weights else v * h) + h
    for i in range(m.num_layers):
        layer = layer_params(m, i)
        decoder = decoder + layer
        if is_moe_layer(m, i):
            active += layer.dense + m.moe_router_topk * expert_params(m)
        else:
            active += layer.dense
    n_mtp = m.mtp_num_layers or 0
    # The MTP layer has the shape of the last decoder layer (Megatron builds it from that layer's spec).
    mtp_layer = layer_params(m, m.num_layers - 1)
    mtp = (mtp_layer + Split(dense=mtp_extra_params(m))) * n_mtp
    n_moe = sum(is_moe_layer(m, i) for i in range(m.num_layers)) + (n_mtp if is_moe_layer(m, m.num_layers - 1) else 0)
    bias = n_moe * (m.num_experts or 0) if m.moe_router_enable_expert_bias else 0
    return ParamCount(
        embedding=v * h,
        output=v * h if m.untie_embeddings_and_output_weights else 0,
        decoder=decoder,
        mtp=mtp,
        expert_bias=bias,
        active_per_token=active,
        mtp_layers=n_mtp,
    )


# ----------------------------------------------------------------------------------------------- per GPU
def _tp_shard(n: int, tp: int) -> int:
    return n // tp


def attention_params_per_gpu(m: ModelConfig, tp: int) -> int:
    """One layer's attention on one TP rank: head-sharded projections split; norms and MLA's down projections
    replicated."""
    h, n = m.hidden_size, m.num_attention_heads
    if m.multi_latent_attention:
        q_head = m.qk_head_dim + m.qk_pos_emb_head_dim
        rep = h + m.kv_lora_rank  # input norm, kv latent norm
        down = h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
        if m.q_lora_rank:
            rep += m.q_lora_rank
            down += h * m.q_lora_rank
            shard = m.q_lora_rank * n * q_head
        else:
            shard = h * n * q_head
        shard += m.kv_lora_rank * n * (m.qk_head_dim + m.v_head_dim) + n * m.v_head_dim * h
        return rep + down + _tp_shard(shard, tp)
    return h + _tp_shard(attention_params(m) - h, tp)


def layer_params_per_gpu(m: ModelConfig, index: int, tp: int, ep: int, etp: int) -> Split:
    """One decoder layer on one GPU: attention/dense MLP/shared expert split TP-way, routed experts E/EP per rank,
    each split ETP-way, router and norms replicated."""
    attn = attention_params_per_gpu(m, tp)
    h = m.hidden_size
    if is_moe_layer(m, index):
        dense = attn + h + router_params(m) + _tp_shard(shared_expert_params(m), tp)
        return Split(dense=dense, expert=(m.num_experts // ep) * _tp_shard(expert_params(m), etp))
    return Split(dense=attn + h + _tp_shard(3 * h * m.ffn_hidden_size, tp), expert=0)


def stage_layers(m: ModelConfig, pp: int, stage: int, p: ParallelConfig | None = None) -> range:
    """Decoder layer indices on pipeline stage `stage` (even split, or the config's first/last stage sizes)."""
    if p is None:
        p = ParallelConfig(pipeline_model_parallel_size=pp)
    counts = p.pipeline_stage_layers(m.num_layers)
    start = sum(counts[:stage])
    return range(start, start + counts[stage])


def stage_params_per_gpu(m: ModelConfig, p: ParallelConfig, stage: int) -> Split:
    """Parameters one GPU of pipeline stage `stage` holds: its layers' shards, plus the (padded, vocab-parallel)
    embedding on the first stage and final norm, output layer and MTP modules (with their embedding copy when
    PP > 1) on the last."""
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    h = m.hidden_size
    vocab_shard = m.padded_vocab_size(tp) // tp * h
    total = Split()
    for i in stage_layers(m, pp, stage, p):
        total = total + layer_params_per_gpu(m, i, tp, ep, etp)
    first, last = stage == 0, stage == pp - 1
    if first:
        total = total + Split(dense=vocab_shard)
    if last:
        total = total + Split(dense=h)  # final norm
        if m.untie_embeddings_and_output_weights or not first:
            # Tied weights still need a copy of the embedding on the last stage when PP > 1 (Megatron keeps one and
            # all-reduces its gradient with the first stage's).
            total = total + Split(dense=vocab_shard)
        n_mtp = m.mtp_num_layers or 0
        if n_mtp:
            if not first:
                # MTP embeds the shifted tokens itself: Megatron builds a second (shared) embedding on the last stage.
                total = total + Split(dense=vocab_shard)
            mtp_layer = layer_params_per_gpu(m, m.num_layers - 1, tp, ep, etp)
            total = total + (mtp_layer + Split(dense=mtp_extra_params(m))) * n_mtp
    return total
