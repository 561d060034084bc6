"""Forward steps for Megatron's schedule that turn hidden states into response-token log-probs and the GRPO loss.

Only response positions are gathered before the output projection, and the fused op never builds [tokens × vocab]
logits; with TP the vocab-parallel output weight is combined across the TP group inside the op.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from megatron_r1.models.heads import hidden_states_output, output_weight
from megatron_r1.models.positions import rotary_positions
from megatron_r1.models.prefix_attention import PrefixLayout, prefix_attention
from megatron_r1.rl.batch import PolicyBatch
from megatron_r1.training.setup import unwrap


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def response_logprobs(hidden: torch.Tensor, model, mb: PolicyBatch, temperature: float, entropy: bool = False):
    """log π(response token) [b, R] (and entropy [b, R]) from final hidden states [b, s, H]."""
    from megatron_r1.ops import token_logprobs

    b, r = mb.response_index.shape
    rows = (torch.arange(b, device=hidden.device) // mb.answers_per_row).unsqueeze(1)  # each answer's row
    h = hidden[rows, mb.response_index]  # [b, R, H]
    targets = mb.response_labels if mb.response_labels is not None else mb.labels[rows, mb.response_index]  # [b, R]
    out = token_logprobs(h.reshape(b * r, -1), output_weight(model), targets.reshape(-1), temperature=temperature,
                         return_entropy=entropy, tp_group=_tp_group())
    if entropy:
        lp, ent = out
        return lp.view(b, r), ent.view(b, r)
    return out.view(b, r)


@contextlib.contextmanager
def hidden_mode(model_chunks: list):
    with contextlib.ExitStack() as stack:
        for chunk in model_chunks:
            stack.enter_context(hidden_states_output(unwrap(chunk)))
        yield


def micro_batches(batch: PolicyBatch, micro_batch_size: int, device) -> Iterator[PolicyBatch]:
    """Micro-batches of `micro_batch_size` answers (whole groups in shared-prefix rows)."""
    for start in range(0, len(batch), micro_batch_size):
        yield batch.slice(start, start + micro_batch_size).to(device)


def model_forward(model, mb: PolicyBatch) -> torch.Tensor:
    """The model on one micro-batch: causal rows as they are; shared-prefix rows with their attention mask, their
    block layout (prompt, answers) for the local core attention, and rotary embeddings at their position ids (every
    pipeline stage gets all three from the micro-batch)."""
    if mb.attention_mask is None:
        return model(mb.tokens, mb.position_ids, None)
    inner = unwrap(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rotary_positions(inner, mb.position_ids))
        if mb.segments is not None:
            layout = PrefixLayout.from_segments(mb.segments, mb.answers_per_row, mb.attention_mask)
            stack.enter_context(prefix_attention(inner, layout))
        return model(mb.tokens, mb.position_ids, mb.attention_mask)


def make_logprob_step(temperature: float):
    """Forward-only step: each micro-batch's response log-probs come back in the schedule's output list."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        hidden = model_forward(model, mb)

        def loss_func(output):
            with torch.no_grad():
                lp = response_logprobs(output, unwrap(model), mb, temperature)
            return torch.zeros((), device=output.device), {"logprobs": lp.float().cpu()}

        return hidden, loss_func

    return forward_step


def compute_logprobs(model_chunks: list, batch: PolicyBatch, micro_batch_size: int, temperature: float,
                     device) -> Optional[torch.Tensor]:
    """Response log-probs [N, R] of `batch` under the model (no grad); None on ranks without the last stage.
    `micro_batch_size` counts answers."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    n_micro = (len(batch) + micro_batch_size - 1) // micro_batch_size
    was_training = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()
    try:
        with torch.no_grad(), hidden_mode(model_chunks):
            outs = get_forward_backward_func()(
                forward_step_func=make_logprob_step(temperature),
                data_iterator=micro_batches(batch, micro_batch_size, device),
                model=model_chunks, num_microbatches=n_micro, seq_length=batch.tokens.shape[1],
                micro_batch_size=batch.rows(micro_batch_size), decoder_seq_length=batch.tokens.shape[1],
                forward_only=True,
            )
    finally:
        for c, t in zip(model_chunks, was_training):
            c.train(t)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat([o["logprobs"] for o in outs], dim=0)


def make_policy_loss_step(rl_cfg, temperature: float, token_scale: Optional[float] = None):
    """Training step: GRPO clipped surrogate (+ KL to the reference) on one micro-batch.

    `token_scale`, for `loss_agg="token-mean"`: the schedule averages micro-batch losses, so each micro-batch's
    token mean is re-weighted by (its tokens / mean tokens per micro-batch) to give the exact mean over all
    tokens of the mini-batch.
    """
    from megatron_r1.ops import grpo_policy_loss

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        hidden = model_forward(model, mb)

        def loss_func(output):
            lp, ent = response_logprobs(output, unwrap(model), mb, temperature, entropy=True)
            old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
            loss, m = grpo_policy_loss(
                lp, old, mb.advantages, mb.response_mask, ref_logprobs=mb.ref_logprobs,
                clip_low=rl_cfg.clip_low, clip_high=rl_cfg.clip_high, kl_coef=rl_cfg.kl_coef,
                kl_estimator=rl_cfg.kl_estimator, loss_agg=rl_cfg.loss_agg, ratio_level=rl_cfg.ratio_level,
                behavior_logprobs=mb.behavior_logprobs if rl_cfg.tis_cap else None, tis_cap=rl_cfg.tis_cap,
            )
            if token_scale is not None:
                loss = loss * (mb.response_mask.sum() / token_scale)
            mask = mb.response_mask
            ent_mean = (ent.detach() * mask).sum() / mask.sum().clamp_min(1.0)
            metrics = {"loss": loss.detach().clone(), "entropy": ent_mean}
            for k, v in m.items():
                metrics[k] = float(v)
            return loss, metrics

        return hidden, loss_func

    return forward_step
