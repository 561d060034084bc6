"""Build what a training stage holds: model chunks wrapped in Megatron DDP, the optimizer, the LR scheduler.

CPU support (gloo): Megatron's DDP with grad buffers and its FP32 optimizer (torch AdamW, since apex/TE's fused
Adam are absent) work; the distributed optimizer refuses non-CUDA parameters in Megatron-Core 0.16.1, so on CPU
`parallel.use_distributed_optimizer` is rejected with a clear error. On GPUs bf16 uses Megatron's mixed-precision
optimizer with fp32 master weights, and the distributed optimizer (ZeRO-1 over DP) is available.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_r1.config import Config
from megatron_r1.errors import ConfigError
from megatron_r1.models.builder import build_model, resolve_dtype
from megatron_r1.models.unwrap import unwrap
from megatron_r1.parallel.runtime import ParallelContext


@dataclass
class TrainState:
    """Everything a stage trains and checkpoints. `step` counts optimizer steps; `consumed_samples` the data."""

    model: list  # model chunks (DDP-wrapped); one chunk unless virtual pipeline stages are used
    optimizer: object
    scheduler: object
    config: Config
    ctx: ParallelContext
    step: int = 0
    consumed_samples: int = 0
    extra: dict = field(default_factory=dict)  # stage-specific state saved with checkpoints (e.g. data order)

    @property
    def unwrapped(self) -> list:
        """The bare GPTModel chunks (DDP's `.module`), for generation and inspection."""
        return [unwrap(m) for m in self.model]


def build_ddp_model(cfg: Config, trainable: bool = True, module=None):
    """This rank's model chunk (`module`, or the GPTModel of `cfg.model`), wrapped in Megatron DDP (grad buffers,
    DP all-reduce) when trainable. The reward model passes its own module (a GPTModel trunk with a head)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model = module if module is not None else build_model(cfg.model, cfg.parallel, cfg.training.precision)
    if cfg.training.recompute_activations:
        model.config.recompute_granularity = "full"
        model.config.recompute_method = "uniform"
        model.config.recompute_num_layers = 1
    if not trainable:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        check_for_nan_in_grad=False,  # we check the loss and grad norm ourselves and skip the step
        bucket_size=None,
    )
    ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)
    return ddp


# OptimizerConfig fields of the same name and meaning in our `optimizer:` section
_ADAM_FIELDS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad")


def build_optimizer(cfg: Config, model_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    dtype = resolve_dtype(cfg.training.precision)
    if cfg.parallel.use_distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError(
            "parallel.use_distributed_optimizer: Megatron-Core's distributed optimizer needs CUDA parameters; "
            "on CPU use the plain optimizer (set it to false)"
        )
    ocfg = OptimizerConfig(
        optimizer="adam",
        **{name: getattr(o, name) for name in _ADAM_FIELDS},
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, model_chunks)


def build_scheduler(cfg: Config, optimizer, total_steps: Optional[int] = None):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optimizer
    steps = max(1, total_steps if total_steps is not None else cfg.training.train_steps)
    warmup = min(o.lr_warmup_steps, steps - 1) if steps > 1 else 0
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=steps,
        lr_decay_style=o.lr_decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=steps,
        wd_incr_style="constant",
    )


def _finalize_grads_with_load_snapshot(model_chunks, *args, **kwargs):
    """Megatron's finalize_model_grads (DP/SP/embedding grad all-reduce, expert-bias update), after keeping each
    router's token counts of this step for the MoE load metric (the update resets them)."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in model_chunks:
        for module in unwrap(chunk).modules():
            counts = getattr(module, "local_tokens_per_expert", None)
            if counts is not None and hasattr(module, "expert_bias"):
                module.last_load = counts.detach().clone()
    return finalize_model_grads(model_chunks, *args, **kwargs)


def attach_schedule_hooks(model_chunks: list) -> None:
    """What Megatron-LM's training loop sets on the config: grad finalisation and DDP's no-sync for micro-batches."""
    config = unwrap(model_chunks[0]).config
    config.finalize_model_grads_func = _finalize_grads_with_load_snapshot
    if len(model_chunks) == 1:
        config.no_sync_func = model_chunks[0].no_sync


def build_train_state(cfg: Config, ctx: ParallelContext, total_steps: Optional[int] = None,
                      module=None) -> TrainState:
    """DDP model chunk (of `module` when given), optimizer and LR schedule over `total_steps` optimizer steps."""
    model = build_ddp_model(cfg, module=module)
    attach_schedule_hooks([model])
    optimizer = build_optimizer(cfg, [model])
    scheduler = build_scheduler(cfg, optimizer, total_steps)
    return TrainState(model=[model], optimizer=optimizer, scheduler=scheduler, config=cfg, ctx=ctx)
