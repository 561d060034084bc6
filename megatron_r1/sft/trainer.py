"""`stage: sft`: supervised fine-tuning on templated (prompt, response) samples, loss on the response only.

Used for R1's cold start (stage 1), the rejection-sampled SFT of stage 3 (2 epochs) and distillation into dense
students. Same training step, checkpoints, resume and logging as pre-training; held-out loss every
`training.eval_interval` steps and at the end.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from megatron_r1.config import Config
from megatron_r1.logging import get_logger
from megatron_r1.sft.data import build_sft_rows
from megatron_r1.training.lm_data import PackedLMDataset
from megatron_r1.training.loop import resume_or_init, run_loop
from megatron_r1.training.pretrain import lm_forward_step, lm_train_step
from megatron_r1.training.prologue import num_microbatches, start_stage
from megatron_r1.training.setup import build_train_state

log = get_logger()


def heldout_loss(state, dataset: PackedLMDataset, cfg: Config, device, max_batches: int) -> float:
    """Mean response-token loss over up to `max_batches` micro-batches of the held-out set (forward only)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = cfg.training.micro_batch_size
    n = min(max_batches, max(1, len(dataset) // mbs))
    batches = (dataset.make_batch(list(range(i * mbs, min(len(dataset), (i + 1) * mbs)))) for i in range(n))
    for chunk in state.model:
        chunk.eval()
    try:
        with torch.no_grad():
            outs = get_forward_backward_func()(
                forward_step_func=partial(lm_forward_step, device=device), data_iterator=batches, model=state.model,
                num_microbatches=n, seq_length=cfg.model.seq_length, micro_batch_size=mbs,
                decoder_seq_length=cfg.model.seq_length, forward_only=True)
    finally:
        for chunk in state.model:
            chunk.train()
    if not ps.is_pipeline_last_stage(ignore_virtual=True) or not outs:
        return math.nan
    return float(sum(float(o["loss"]) for o in outs) / len(outs))


def run_sft(cfg: Config) -> dict:
    """Fine-tune for `training.num_epochs` epochs (or `train_steps`); resumable; returns the last metrics."""
    t = cfg.training
    stage = start_stage(cfg)
    tokenizer, seq = stage.tokenizer, cfg.model.seq_length
    train = stage.samples("train")
    rows = build_sft_rows(train, tokenizer, stage.template, seq)
    if rows.truncated:
        log.warning("sft: %d of %d samples are longer than model.seq_length=%d and were cut", rows.truncated,
                    len(train), seq)
    dataset = PackedLMDataset(rows.tokens, tokenizer.pad_id, t.seed, target_mask=rows.target_mask)
    eval_set = None
    if t.eval_interval or cfg.data.eval_source:
        held = stage.samples("test")
        if held:
            er = build_sft_rows(held, tokenizer, stage.template, seq)
            eval_set = PackedLMDataset(er.tokens, tokenizer.pad_id, t.seed, target_mask=er.target_mask)
    steps = t.train_steps
    if t.num_epochs is not None:
        steps = max(1, math.ceil(t.num_epochs * len(dataset) / t.global_batch_size))
    state = build_train_state(cfg, stage.ctx, steps)
    resume_or_init(state)
    n_micro = num_microbatches(cfg, stage.ctx.dp_size)

    def one_step(state):
        metrics = lm_train_step(state, dataset, n_micro)
        if eval_set is not None and ((t.eval_interval and state.step % t.eval_interval == 0) or state.step == steps):
            metrics["eval/loss"] = heldout_loss(state, eval_set, cfg, stage.ctx.device, t.eval_batches)
        return metrics

    return run_loop(state, steps, one_step, desc="sft")
