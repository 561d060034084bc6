"""Per-GPU memory of a layout: weights, gradients, optimizer states, activations, the colocated engine's KV cache.

An estimate for choosing a layout before asking for nodes, not an allocator trace. Assumptions, each a Megatron
default on GPUs:
- bf16 weights ("auto" precision plans for GPUs) with fp32 gradient accumulation buffers (`main_grad`), unsharded
  under ZeRO-1; the distributed optimizer shards the fp32 master copy and both Adam moments (12 bytes/param) over
  the data-parallel group, and routed-expert parameters over the expert-data-parallel group. In fp32 the weights
  are the master copy, so the optimizer holds only the two moments.
- Activations in the weights' dtype, stored as in Korthikanti et al. 2022 ("Reducing Activation Recomputation"),
  adapted to MLA, SwiGLU and routed experts, with flash attention (no s×s scores kept) and sequence parallelism when
  TP > 1. 1F1B keeps PP - stage micro-batches in flight on a stage; full recompute keeps each layer's input and
  re-runs one layer at a time. Logits are fp32 (loss / log-probs).
- GRPO runs the inference engine in the same processes on the same weights (no copy), so only its KV cache is
  extra, and the frozen reference model's weights are resident unless `rl.reference_offload`. The cache is the
  engine's paged pool, counted as the engine sizes it (`engine_kv_tokens`): `generation.kv_cache_blocks`, else
  `generation.kv_cache_memory_gb` (its block count set by the stage with the most layers, as the engine's stages
  agree on it), else room for the engine's most concurrent requests at full context. Everything is summed
  as if alive at once: the engine's cache is not freed before the update step.
Units are GiB (2^30 bytes), also for --gpu-memory-gb.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from megatron_r1.config import Config, validate_world_size
from megatron_r1.errors import ConfigError
from megatron_r1.planning.params import (ParamCount, count_params, is_moe_layer, stage_layers,
                                         stage_params_per_gpu)

GIB = 1024 ** 3
DEFAULT_OVERHEAD_GB = 4.0  # CUDA context (~0.5 GiB), NCCL/all-to-all buffers, allocator fragmentation


@dataclass
class Layout:
    """Sizes of every parallel dimension for a world of `nodes × gpus_per_node` GPUs."""

    world: int
    tp: int
    pp: int
    ep: int
    etp: int
    dp: int
    edp: int  # expert data parallel: the group that shards routed-expert optimizer states
    num_microbatches: int


@dataclass
class Plan:
    """The worst (largest) pipeline stage's memory per GPU and whether it fits."""

    config: str
    stage_kind: str
    layout: Layout
    total_params: int  # main model without MTP (DeepSeek-V3: the "671B")
    mtp_params: int
    trainable_params: int  # what Megatron instantiates: main + MTP, embedding/output rows padded
    hf_checkpoint_params: int  # DeepSeek's HF checkpoint: MTP with its own embedding/head copies (the "685B")
    active_params_per_token: int
    params_per_gpu: int
    worst_stage: int
    recompute: bool
    micro_batch_size: int
    seq_length: int
    kv_cache_tokens_per_gpu: int
    gpu_memory_gb: float
    per_gpu_gb: dict
    activations_gb: dict  # {"no_recompute": .., "full_recompute": ..} on the worst stage
    fits: bool
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_layout(cfg: Config, world: int, micro_batch_size: int | None = None) -> Layout:
    p = cfg.parallel
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel_size or tp
    validate_world_size(p, world)
    dp = world // (tp * pp)
    mbs = micro_batch_size or cfg.training.micro_batch_size
    nmb = p.num_microbatches or max(1, cfg.training.global_batch_size // (mbs * dp))
    return Layout(world=world, tp=tp, pp=pp, ep=ep, etp=etp, dp=dp, edp=dp * tp // (ep * etp), num_microbatches=nmb)


# ----------------------------------------------------------------------------------------------- activations
def layer_activation_elements(cfg: Config, index: int, tp: int, etp: int = 1) -> float:
    """Activation elements kept for backward per token by decoder layer `index` on one TP rank (no recompute).

    With sequence parallelism, norms and residuals hold s/t tokens; head-sharded tensors hold n/t heads. Routed
    experts: each of the rank's s/t tokens goes to top-k experts; an expert split over `etp` ranks sees the tokens of
    its whole expert-TP group at full hidden width and 1/etp of its FFN width (balanced routing assumed). MLA's
    latents are replicated over TP.
    """
    m = cfg.model
    h, n = m.hidden_size, m.num_attention_heads
    # input norm's input + (SP-local) input of the q/kv (or qkv) projections
    elems = 2 * h / tp
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank:
            elems += 2 * m.q_lora_rank  # q latent before and after its norm
        elems += (m.kv_lora_rank + m.qk_pos_emb_head_dim) + m.kv_lora_rank  # kv latent + rope key, normed latent
        # q_up and kv_up outputs; q, k, v and the attention output kept by flash attention
        elems += (n * qk + n * (m.qk_head_dim + m.v_head_dim) + 2 * n * qk + 2 * n * m.v_head_dim) / tp
    else:
        d = m.kv_channels or h // n
        g = m.num_query_groups or n
        elems += ((n + 2 * g) * d + 2 * n * d + 2 * g * d) / tp  # qkv output; q, k, v, attention output
    elems += 2 * h / tp  # pre-MLP norm input and the MLP's input
    if is_moe_layer(m, index):
        k = m.moe_router_topk
        # router logits and scores in fp32 (2 elements each); tokens permuted to k experts and back at full width,
        # gathered over expert TP; each expert's SwiGLU (fc1 output, activation) on its 1/etp slice
        elems += (2 * 2 * m.num_experts + k * (2 * h * etp + 3 * m.moe_ffn_hidden_size)) / tp
        elems += 3 * (m.moe_shared_expert_intermediate_size or 0) / tp
    else:
        elems += 3 * m.ffn_hidden_size / tp  # fc1 output (gate and up) and the activation fed to fc2
    return elems


def stage_activation_bytes(cfg: Config, lay: Layout, stage: int, mbs: int, act_bytes: int) -> tuple[float, float]:
    """(no recompute, full recompute) activation bytes on one GPU of pipeline stage `stage`."""
    m = cfg.model
    tokens = m.seq_length * mbs
    layers = list(stage_layers(m, lay.pp, stage, cfg.parallel))
    last = stage == lay.pp - 1
    if last and m.mtp_num_layers:
        layers += [m.num_layers - 1] * m.mtp_num_layers  # an MTP module runs a layer shaped like the last one
    per_layer = [layer_activation_elements(cfg, i, lay.tp, lay.etp) * tokens * act_bytes for i in layers]
    in_flight = min(lay.pp - stage, lay.num_microbatches)
    logits = 0.0
    if last:
        # fp32 logits of the main head and of every MTP head, one micro-batch at a time on the last stage
        heads = 1 + (m.mtp_num_layers or 0)
        logits = heads * tokens * m.padded_vocab_size(lay.tp) / lay.tp * 4
    full = in_flight * sum(per_layer) + logits
    layer_input = m.hidden_size / lay.tp * tokens * act_bytes
    recompute = in_flight * len(layers) * layer_input + (max(per_layer) if per_layer else 0.0) + logits
    return full, recompute


# ----------------------------------------------------------------------------------------------- KV cache
def kv_bytes_per_token_layer(cfg: Config, tp: int, kv_bytes: int) -> float:
    """KV cache bytes per token per layer on one TP rank. MLA caches the shared latent and rope key (replicated over
    TP); GQA caches K and V for the rank's query groups (at least one: groups are replicated when TP > groups)."""
    m = cfg.model
    if m.multi_latent_attention:
        return (m.kv_lora_rank + m.qk_pos_emb_head_dim) * kv_bytes
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    g = m.num_query_groups or m.num_attention_heads
    return 2 * max(g // tp, 1) * d * kv_bytes


def engine_kv_tokens(cfg: Config, tp: int, max_stage_layers: int, kv_bytes: int) -> int:
    """Tokens the GRPO engine's paged pool holds on each GPU, sized as `inference.Engine` sizes it (0 outside GRPO):
    `generation.kv_cache_blocks` blocks; else as many blocks as fit in `generation.kv_cache_memory_gb` on the stage
    with the most layers; else (neither set) `max_batch_size` rows of the full context (prompt + response + 1), the
    rows being min(generation.max_batch_size, prompts_per_step x group_size) as `rl.trainer.build_engine` sets them.
    Scratch block included."""
    from megatron_r1.inference.paged_cache import blocks_for_memory, default_num_blocks

    if cfg.stage != "grpo":
        return 0
    g, r = cfg.generation, cfg.rl
    block = g.kv_block_size
    if g.kv_cache_blocks is not None:
        return g.kv_cache_blocks * block
    if g.kv_cache_memory_gb is not None:
        token_bytes = max_stage_layers * kv_bytes_per_token_layer(cfg, tp, kv_bytes)
        return blocks_for_memory(g.kv_cache_memory_gb, block, int(token_bytes)) * block
    rows = min(g.max_batch_size, r.prompts_per_step * r.group_size)
    context = r.max_prompt_length + r.max_response_length + 1
    return default_num_blocks(rows, context, block) * block


# ----------------------------------------------------------------------------------------------- the plan
def plan_memory(cfg: Config, nodes: int, gpus_per_node: int = 8, gpu_memory_gb: float = 80.0,
                recompute: bool | None = None, micro_batch_size: int | None = None,
                kv_cache_tokens: int | None = None, overhead_gb: float = DEFAULT_OVERHEAD_GB,
                source: str = "config") -> Plan:
    """Memory per GPU of `cfg` on `nodes × gpus_per_node` GPUs; the worst pipeline stage decides whether it fits."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be >= 1, got {nodes} and {gpus_per_node}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ConfigError(f"--micro-batch-size: must be >= 1, got {micro_batch_size}")
    m, p = cfg.model, cfg.parallel
    lay = resolve_layout(cfg, nodes * gpus_per_node, micro_batch_size)
    mbs = micro_batch_size or cfg.training.micro_batch_size
    recompute = cfg.training.recompute_activations if recompute is None else recompute
    fp32 = cfg.training.precision == "fp32"
    w_bytes = 4 if fp32 else 2
    grad_bytes = 4  # fp32 main_grad buffers (bf16 weights accumulate gradients in fp32)
    opt_bytes = 8 if fp32 else 12  # (master copy +) Adam exp_avg + exp_avg_sq, fp32
    counts: ParamCount = count_params(m)
    max_layers = max(len(stage_layers(m, lay.pp, stage, p)) for stage in range(lay.pp))
    kv_tokens = (engine_kv_tokens(cfg, lay.tp, max_layers, w_bytes) if kv_cache_tokens is None
                 else kv_cache_tokens)
    reference = cfg.stage == "grpo" and cfg.rl.kl_coef > 0 and not cfg.rl.reference_offload

    best = None
    for stage in range(lay.pp):
        shard = stage_params_per_gpu(m, p, stage)
        opt_dense = shard.dense / (lay.dp if p.use_distributed_optimizer else 1)
        opt_expert = shard.expert / (lay.edp if p.use_distributed_optimizer else 1)
        act_full, act_rc = stage_activation_bytes(cfg, lay, stage, mbs, w_bytes)
        n_layers = len(stage_layers(m, lay.pp, stage, p))
        comp = {
            "parameters": shard.total * w_bytes,
            "gradients": shard.total * grad_bytes,
            "optimizer": (opt_dense + opt_expert) * opt_bytes,
            "activations": act_rc if recompute else act_full,
            "kv_cache": kv_tokens * n_layers * kv_bytes_per_token_layer(cfg, lay.tp, w_bytes),
            "reference_model": shard.total * w_bytes if reference else 0,
            "overhead": overhead_gb * GIB,
        }
        total = sum(comp.values())
        if best is None or total > best[0]:
            best = (total, stage, shard, comp, act_full, act_rc)
    total, stage, shard, comp, act_full, act_rc = best
    per_gpu = {k: round(v / GIB, 3) for k, v in comp.items()}
    per_gpu["total"] = round(total / GIB, 3)
    notes = []
    if not p.use_distributed_optimizer:
        notes.append("parallel.use_distributed_optimizer is false: optimizer states are replicated on every DP rank")
    if cfg.stage == "grpo" and cfg.rl.reference_offload:
        notes.append("rl.reference_offload: reference weights live in host memory")
    return Plan(
        config=source, stage_kind=cfg.stage, layout=lay, total_params=counts.main, mtp_params=counts.mtp.total,
        trainable_params=count_params(m, padded=True).trainable, hf_checkpoint_params=counts.hf_checkpoint,
        active_params_per_token=counts.active_per_token, params_per_gpu=shard.total, worst_stage=stage,
        recompute=recompute, micro_batch_size=mbs, seq_length=m.seq_length, kv_cache_tokens_per_gpu=kv_tokens,
        gpu_memory_gb=gpu_memory_gb, per_gpu_gb=per_gpu,
        activations_gb={"no_recompute": round(act_full / GIB, 3), "full_recompute": round(act_rc / GIB, 3)},
        fits=total <= gpu_memory_gb * GIB, notes=notes,
    )


def _b(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_plan(plan: Plan) -> str:
    """Human-readable plan (the same figures as `Plan.to_dict`)."""
    lay = plan.layout
    lines = [
        f"{plan.config}: stage {plan.stage_kind}",
        f"layout: world {lay.world} = TP {lay.tp} × PP {lay.pp} × DP {lay.dp}; EP {lay.ep} × expert TP {lay.etp} "
        f"× expert DP {lay.edp}; {lay.num_microbatches} micro-batches of {plan.micro_batch_size} × "
        f"{plan.seq_length} tokens",
        f"parameters: {_b(plan.total_params)} main model (without MTP), {_b(plan.mtp_params)} MTP, "
        f"{_b(plan.trainable_params)} trainable in Megatron, {_b(plan.hf_checkpoint_params)} in a DeepSeek-style HF "
        f"checkpoint; {_b(plan.active_params_per_token)} active per token",
        f"per GPU (pipeline stage {plan.worst_stage}, the largest; {_b(plan.params_per_gpu)} parameters):",
    ]
    for k, v in plan.per_gpu_gb.items():
        if k == "total":
            continue
        extra = ""
        if k == "activations":
            extra = (f"  ({'full recompute' if plan.recompute else 'no recompute'}; no recompute "
                     f"{plan.activations_gb['no_recompute']:.2f}, full recompute "
                     f"{plan.activations_gb['full_recompute']:.2f})")
        elif k == "kv_cache":
            extra = f"  ({plan.kv_cache_tokens_per_gpu} tokens)"
        lines.append(f"  {k:<16} {v:9.2f} GiB{extra}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {'total':<16} {plan.per_gpu_gb['total']:9.2f} GiB of {plan.gpu_memory_gb:g} GiB: {verdict}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
