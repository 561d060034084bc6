"""Validate a config against a world size without launching anything: the checks a run would otherwise fail on
minutes later, deep inside Megatron, after the nodes were allocated."""
from __future__ import annotations

from megatron_r1.config import Config, validate
from megatron_r1.errors import ConfigError
from megatron_r1.planning.memory import format_plan, plan_memory, resolve_layout


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_layout(cfg: Config, world_size: int, source: str = "config") -> None:
    """Config validation at `world_size` plus the batch and layout rules Megatron enforces at start-up."""
    _check(world_size >= 1, f"world size must be >= 1, got {world_size}")
    validate(cfg, world_size=world_size, source=source)
    try:
        _validate_batches(cfg, world_size)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _validate_batches(cfg: Config, world_size: int) -> None:
    p, t, m = cfg.parallel, cfg.training, cfg.model
    lay = resolve_layout(cfg, world_size)
    _check(lay.etp >= 1, f"parallel.expert_tensor_parallel_size: must be >= 1, got {lay.etp}")
    per_step = t.micro_batch_size * lay.dp
    _check(t.global_batch_size % per_step == 0,
           f"training.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size × data parallel "
           f"size ({t.micro_batch_size}×{lay.dp} = {per_step}) at world size {world_size}")
    if p.num_microbatches is not None:
        expected = t.global_batch_size // per_step
        _check(p.num_microbatches == expected,
               f"parallel.num_microbatches: {p.num_microbatches} disagrees with global_batch_size / (micro_batch_size "
               f"× DP) = {expected}")
    sp = p.sequence_parallel if p.sequence_parallel is not None else lay.tp > 1
    if m.num_experts and lay.tp > 1:
        _check(sp, "parallel.sequence_parallel: Megatron requires sequence parallelism for MoE with tensor parallelism "
                   f"(TP={lay.tp}); set it to true or leave it unset")
    if cfg.stage == "grpo":
        r = cfg.rl
        rollouts = r.prompts_per_step * r.group_size
        _check(rollouts % lay.dp == 0,
               f"rl.prompts_per_step: {r.prompts_per_step} × group_size {r.group_size} = {rollouts} rollouts do not "
               f"split evenly over {lay.dp} data-parallel ranks")
        _check(r.mini_batch_size % lay.dp == 0,
               f"rl.mini_batch_size: {r.mini_batch_size} does not split evenly over {lay.dp} data-parallel ranks")
        _check(m.seq_length >= r.max_prompt_length + r.max_response_length,
               f"model.seq_length: {m.seq_length} is shorter than rl.max_prompt_length + max_response_length "
               f"({r.max_prompt_length}+{r.max_response_length})")


def dry_run(cfg: Config, world_size: int, gpu_memory_gb: float = 80.0, source: str = "config") -> str:
    """Validate `cfg` on `world_size` ranks and return a summary (layout, batches, memory plan); raise ConfigError
    naming the field when the layout cannot run. The memory estimate only warns: it is an estimate."""
    validate_layout(cfg, world_size, source=source)
    plan = plan_memory(cfg, nodes=1, gpus_per_node=world_size, gpu_memory_gb=gpu_memory_gb, source=source)
    lines = [f"dry run: {source} is valid for world size {world_size}", format_plan(plan)]
    if not plan.fits:
        lines.append(f"warning: estimated {plan.per_gpu_gb['total']:.1f} GiB per GPU exceeds {gpu_memory_gb:g} GiB; "
                     "see `megatron-r1 plan` for the breakdown")
    return "\n".join(lines)
