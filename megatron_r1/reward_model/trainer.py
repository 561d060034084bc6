"""`stage: reward_model`: Bradley–Terry training of the reward model, with held-out pairwise accuracy.

The trunk starts from `checkpoint.load` (an SFT or base checkpoint: weights only) and the scalar head from
scratch; `checkpoint.save` resumes like any other stage.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from megatron_r1.config import Config
from megatron_r1.errors import ConfigError
from megatron_r1.logging import get_logger
from megatron_r1.models.unwrap import unwrap
from megatron_r1.reward_model.model import bradley_terry_loss, build_reward_model, encode_pairs
from megatron_r1.reward_model.preferences import load_preferences
from megatron_r1.training.lm_data import EpochOrder
from megatron_r1.training.loop import resume_or_init, run_loop
from megatron_r1.training.prologue import num_microbatches, start_stage
from megatron_r1.training.setup import build_train_state
from megatron_r1.training.step import train_step

log = get_logger()


def _pair_batches(rows: list[dict], order: list[int], tokenizer, template, seq_length: int, pairs_per_micro: int,
                  device):
    """Micro-batches of 2×pairs rows (chosen, rejected interleaved)."""
    for s in range(0, len(order), pairs_per_micro):
        pick = [rows[i] for i in order[s:s + pairs_per_micro]]
        pc = [(r["prompt"], c) for r in pick for c in (r["chosen"], r["rejected"])]
        tokens, pos, last = encode_pairs(tokenizer, template, pc, seq_length)
        yield tokens.to(device), pos.to(device), last.to(device)


def _forward_step(data_iterator, model):
    tokens, pos, last = next(data_iterator)
    scores = model(tokens, pos, None, last)

    def loss_func(output):
        loss, acc = bradley_terry_loss(output)
        return loss, {"loss": loss.detach().clone(), "pairwise_accuracy": acc.detach()}

    return scores, loss_func


def pairwise_accuracy(model_chunks, rows, tokenizer, template, seq_length: int, device, batch_pairs: int = 32) -> dict:
    """Held-out accuracy (share of pairs where chosen outscores rejected) and mean loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_micro = math.ceil(len(rows) / batch_pairs)
    for c in model_chunks:
        c.eval()
    try:
        with torch.no_grad():
            outs = get_forward_backward_func()(
                forward_step_func=_forward_step,
                data_iterator=_pair_batches(rows, list(range(len(rows))), tokenizer, template, seq_length,
                                            batch_pairs, device),
                model=model_chunks, num_microbatches=n_micro, seq_length=seq_length,
                micro_batch_size=2 * batch_pairs, decoder_seq_length=seq_length, forward_only=True)
    finally:
        for c in model_chunks:
            c.train()
    if not outs:
        return {}
    return {"pairwise_accuracy": sum(float(o["pairwise_accuracy"]) for o in outs) / len(outs),
            "loss": sum(float(o["loss"]) for o in outs) / len(outs)}


def _load_trunk(state, load_dir: str) -> None:
    """`checkpoint.load` is an LM checkpoint (SFT or base): its weights go into the trunk, the head starts fresh."""
    from megatron_r1.checkpoint import load_model_only

    load_model_only(unwrap(state.model[0]).lm, load_dir)
    state.optimizer.reload_model_params()


def run_reward_model(cfg: Config) -> dict:
    """Train the reward model for `training.train_steps` steps (resumable); held-out pairwise accuracy every
    `training.eval_interval` steps and at the end, also written to `run_dir/reward_model_eval.json`."""
    t = cfg.training
    if t.global_batch_size % 2 or t.micro_batch_size % 2:
        raise ConfigError("training.micro_batch_size / global_batch_size: count rows, two per preference pair; "
                          "both must be even")
    stage = start_stage(cfg)
    ctx, tokenizer, template = stage.ctx, stage.tokenizer, stage.template
    train = stage.samples("train", loader=load_preferences)
    held = stage.samples("test", loader=load_preferences)
    state = build_train_state(cfg, ctx, t.train_steps, module=build_reward_model(cfg))
    resume_or_init(state, init_from=_load_trunk)
    n_micro = num_microbatches(cfg, ctx.dp_size)
    pairs_per_micro = t.micro_batch_size // 2
    pairs_per_step = t.global_batch_size // 2
    seq = cfg.model.seq_length
    order = EpochOrder(len(train), t.seed * 31)

    def one_step(state):
        per_rank = pairs_per_step // ctx.dp_size
        start = state.consumed_samples + ctx.dp_rank * per_rank
        picked = [order(i) for i in range(start, start + per_rank)]
        batches = _pair_batches(train, picked, tokenizer, template, seq, pairs_per_micro, ctx.device)
        result = train_step(state, _forward_step, batches, n_micro, seq, t.micro_batch_size)
        state.consumed_samples += pairs_per_step
        state.step += 1
        m = {"loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
             "pairwise_accuracy": result.metrics.get("pairwise_accuracy", math.nan)}
        if held and ((t.eval_interval and state.step % t.eval_interval == 0) or state.step == t.train_steps):
            ev = pairwise_accuracy(state.model, held, tokenizer, template, seq, ctx.device)
            m.update({f"eval/{k}": v for k, v in ev.items()})
        return m

    last = run_loop(state, t.train_steps, one_step, desc="reward_model")
    if ctx.is_logging_rank and "eval/pairwise_accuracy" in last:
        out = Path(cfg.logging.run_dir) / "reward_model_eval.json"
        out.write_text(json.dumps({"heldout_pairs": len(held), "pairwise_accuracy": last["eval/pairwise_accuracy"],
                                   "loss": last.get("eval/loss")}, indent=2) + "\n")
        log.info("reward model: held-out pairwise accuracy %.3f on %d pairs", last["eval/pairwise_accuracy"],
                 len(held))
    return last
