"""Plain language-model pre-training (`stage: pretrain`): how the demo's tiny base model is made.

Next-token cross entropy (Megatron's vocab-parallel loss) over packed documents, through the same training step,
checkpointing and logging as every other stage.
"""
from __future__ import annotations

import math
import time
from functools import partial


from megatron_r1.config import Config
from megatron_r1.training.lm_data import PackedLMDataset, pack_documents, read_text_documents, to_device
from megatron_r1.training.loop import resume_or_init, run_loop
from megatron_r1.training.prologue import num_microbatches, start_stage
from megatron_r1.training.setup import build_train_state
from megatron_r1.training.step import train_step


def lm_forward_step(data_iterator, model, device=None):
    """Megatron forward step: per-token loss from the model, masked mean in the loss function."""
    batch = next(data_iterator)
    if device is not None:
        batch = to_device(batch, device)
    output = model(batch.tokens, batch.position_ids, None, labels=batch.labels, loss_mask=batch.loss_mask)

    def loss_func(output_tensor):
        mask = batch.loss_mask
        loss = (output_tensor.float() * mask).sum() / mask.sum().clamp_min(1.0)
        # A copy for logging: Megatron's schedule divides the returned loss by the micro-batch count in place.
        return loss, {"loss": loss.detach().clone(), "tokens": mask.sum().detach()}

    return output, loss_func


def build_lm_dataset(cfg: Config, tokenizer) -> PackedLMDataset:
    docs = read_text_documents(cfg.data.source, dict(cfg.data.options))
    windows = pack_documents([tokenizer.encode(d) for d in docs], cfg.model.seq_length, tokenizer.pad_id,
                             tokenizer.eos_id)
    return PackedLMDataset(windows, tokenizer.pad_id, cfg.training.seed)


def lm_train_step(state, dataset: PackedLMDataset, n_micro: int) -> dict:
    """One optimizer step of next-token training on the dataset's next global batch; returns its metrics.

    Shared by pre-training and SFT (whose dataset masks the prompt out of the loss)."""
    cfg, ctx, t = state.config, state.ctx, state.config.training
    t0 = time.perf_counter()
    batches = dataset.micro_batches(state.consumed_samples, t.global_batch_size, t.micro_batch_size, ctx.dp_rank,
                                    ctx.dp_size)
    result = train_step(state, partial(lm_forward_step, device=ctx.device), batches, n_micro, cfg.model.seq_length,
                        t.micro_batch_size)
    state.consumed_samples += t.global_batch_size
    state.step += 1
    dt = time.perf_counter() - t0
    tokens = result.metrics.get("tokens", 0.0) * n_micro * ctx.dp_size
    metrics = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr, "skipped": float(result.skipped),
               "tokens_per_s": tokens / dt if dt > 0 else math.nan, "consumed_samples": state.consumed_samples,
               "epoch": state.consumed_samples / len(dataset)}
    metrics.update({k: v for k, v in result.metrics.items() if k.startswith("moe/")})
    return metrics


def run_pretrain(cfg: Config) -> dict:
    """Train for `training.train_steps` steps (resuming if `checkpoint.save` has a checkpoint); return last metrics."""
    stage = start_stage(cfg)
    dataset = build_lm_dataset(cfg, stage.tokenizer)
    state = build_train_state(cfg, stage.ctx, cfg.training.train_steps)
    resume_or_init(state)
    n_micro = num_microbatches(cfg, stage.ctx.dp_size)
    return run_loop(state, cfg.training.train_steps, lambda state: lm_train_step(state, dataset, n_micro),
                    desc="pretrain")
