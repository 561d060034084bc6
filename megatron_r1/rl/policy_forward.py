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
from megatron_r1.models.unwrap import unwrap
# The loss ops by module attribute, looked up at each call: the trainer takes whatever megatron_r1.ops holds
# (tests count and poison the calls there).
from megatron_r1 import ops
from megatron_r1.ops import PolicyLossConfig
from megatron_r1.ops.loss import aggregation_units
from megatron_r1.rl.batch import PolicyBatch


def _tp_group():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def response_logprobs(hidden: torch.Tensor, model, mb: PolicyBatch, temperature: float, entropy: bool = False):
    """log π(response token) [b, R] (and entropy [b, R]) from final hidden states [b, s, H]."""
    b, r = mb.response_index.shape
    rows = (torch.arange(b, device=hidden.device) // mb.answers_per_row).unsqueeze(1)  # each answer's row
    h = hidden[rows, mb.response_index]  # [b, R, H]
    targets = mb.response_labels if mb.response_labels is not None else mb.labels[rows, mb.response_index]  # [b, R]
    out = ops.token_logprobs(h.reshape(b * r, -1), output_weight(model), targets.reshape(-1), temperature=temperature,
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


def plan_micro_batches(batch: PolicyBatch, micro_batch_size: int, max_tokens: Optional[int] = None) -> list:
    """Which rows go into each micro-batch: lists of row indices.

    Fixed: `micro_batch_size` answers each, in order. Token budget (`max_tokens`, verl/slime's dynamic batch size):
    rows sorted longest first and packed greedily while rows × longest row <= max_tokens (a padded micro-batch
    costs its width times its rows), so short answers share a micro-batch instead of each paying the longest's
    padding; a row longer than the budget gets a micro-batch of its own.
    """
    n_rows = batch.tokens.shape[0]
    if max_tokens is None:
        per = batch.rows(micro_batch_size)
        return [list(range(s, min(n_rows, s + per))) for s in range(0, n_rows, per)]
    lengths = batch.padded_lengths().tolist()
    order = sorted(range(n_rows), key=lambda i: (-lengths[i], i))
    plan, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > max_tokens:
            plan.append(sorted(cur))
            cur = []
        cur.append(i)
    if cur:
        plan.append(sorted(cur))
    return plan


def micro_batches(batch: PolicyBatch, micro_batch_size: int, device, loss_agg: Optional[str] = None,
                  max_tokens: Optional[int] = None, plan: Optional[list] = None) -> Iterator[PolicyBatch]:
    """Micro-batches of `micro_batch_size` answers (whole groups in shared-prefix rows), or packed by a token
    budget (plan_micro_batches), each trimmed of the padding its own rows do not need.

    With `loss_agg` each micro-batch carries its `loss_scale`, so that the schedule's mean over micro-batches is
    the mini-batch's loss however unevenly the answers are split (ops.loss.aggregation_units).
    """
    plan = plan if plan is not None else plan_micro_batches(batch, micro_batch_size, max_tokens)
    total = aggregation_units(batch.response_mask, loss_agg) if loss_agg else None
    for rows in plan:
        mb = batch.take(rows).trimmed()
        if total is not None:
            mb.loss_scale = aggregation_units(mb.response_mask, loss_agg) * len(plan) / max(total, 1.0)
        yield mb.to(device)


def padding_fraction(batch: PolicyBatch, plan: list) -> float:
    """The share of the model's input positions over `plan`'s micro-batches that hold padding."""
    lengths = batch.padded_lengths()
    real, paid = 0, 0
    for rows in plan:
        ls = lengths[rows]
        width = min(batch.tokens.shape[1], -(-max(1, int(ls.max())) // batch.pad_multiple) * batch.pad_multiple)
        real += int(ls.sum())
        paid += width * len(rows)
    return 1.0 - real / max(paid, 1)


def model_forward(model, mb: PolicyBatch) -> torch.Tensor:
    """The model on one micro-batch: causal rows as they are; shared-prefix rows with their attention mask, their
    block layout (prompt, answers) for the local core attention, and rotary embeddings at their position ids (every
    pipeline stage gets all three from the micro-batch). A micro-batch with recorded routing hands it to the
    chunk's active router replays (models.router_replay.routing_replay; nothing happens outside one)."""
    if mb.routing is not None:
        from megatron_r1.models.router_replay import set_targets

        set_targets(model, mb.routing, mb.routing_layers)
    if mb.attention_mask is None:
        return model(mb.tokens, mb.position_ids, None)
    inner = unwrap(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(rotary_positions(inner, mb.position_ids))
        if mb.segments is not None:
            layout = PrefixLayout.from_segments(mb.segments, mb.answers_per_row, mb.attention_mask)
            stack.enter_context(prefix_attention(inner, layout))
        return model(mb.tokens, mb.position_ids, mb.attention_mask)


def make_logprob_step(temperature: float, width: Optional[int] = None):
    """Forward-only step: each micro-batch's response log-probs come back in the schedule's output list, padded
    back to `width` response columns (micro-batches are trimmed to their own longest response)."""

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        hidden = model_forward(model, mb)

        def loss_func(output):
            with torch.no_grad():
                lp = response_logprobs(output, unwrap(model), mb, temperature).float().cpu()
            if width is not None and lp.shape[1] < width:
                lp = torch.nn.functional.pad(lp, (0, width - lp.shape[1]))
            return torch.zeros((), device=output.device), {"logprobs": lp}

        return hidden, loss_func

    return forward_step


def compute_logprobs(model_chunks: list, batch: PolicyBatch, micro_batch_size: int, temperature: float,
                     device, max_tokens: Optional[int] = None) -> Optional[torch.Tensor]:
    """Response log-probs [N, R] of `batch` under the model (no grad); None on ranks without the last stage.
    `micro_batch_size` counts answers; `max_tokens` packs micro-batches by a token budget instead."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    plan = plan_micro_batches(batch, micro_batch_size, max_tokens)
    n_micro = len(plan)
    was_training = [c.training for c in model_chunks]
    for c in model_chunks:
        c.eval()
    try:
        with torch.no_grad(), hidden_mode(model_chunks):
            outs = get_forward_backward_func()(
                forward_step_func=make_logprob_step(temperature, batch.response_mask.shape[1]),
                data_iterator=micro_batches(batch, micro_batch_size, device, plan=plan),
                model=model_chunks, num_microbatches=n_micro, seq_length=batch.tokens.shape[1],
                micro_batch_size=batch.rows(micro_batch_size), decoder_seq_length=batch.tokens.shape[1],
                forward_only=True,
            )
    finally:
        for c, t in zip(model_chunks, was_training):
            c.train(t)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    k = batch.answers_per_row
    order = torch.tensor([r * k + j for rows in plan for r in rows for j in range(k)], dtype=torch.long)
    out = torch.empty((len(batch), batch.response_mask.shape[1]))
    out[order] = torch.cat([o["logprobs"] for o in outs], dim=0)
    return out


def loss_config(rl_cfg):
    """The policy loss's knobs from the `rl` config section (every convention it names, none implied)."""
    return PolicyLossConfig(
        clip_low=rl_cfg.clip_low, clip_high=rl_cfg.clip_high, kl_coef=rl_cfg.kl_coef,
        kl_estimator=rl_cfg.kl_estimator, loss_agg=rl_cfg.loss_agg, policy_loss=rl_cfg.policy_loss,
        tis_cap=rl_cfg.tis_cap, max_response_length=rl_cfg.max_response_length, clip_ratio_c=rl_cfg.clip_ratio_c,
        kl_clamp=rl_cfg.kl_clamp, tis_on_kl=rl_cfg.tis_on_kl, tis_level=rl_cfg.tis_level)


def make_policy_loss_step(rl_cfg, temperature: float, fused: bool = True):
    """Training step: the configured policy loss (+ KL to the reference) on one micro-batch, times the
    micro-batch's `loss_scale` (its share of the mini-batch: see micro_batches), so that the schedule's mean over
    micro-batches is the mini-batch's loss exactly, for every aggregation and any split.

    `fused` (default): ops.fused_grpo_loss from the gathered response hidden states, whose forward yields the
    gradients of hidden and output weight chunk by chunk (3 matmuls over [tokens × vocab]: logits, grad hidden,
    grad weight) instead of token_logprobs + grpo_policy_loss (4: the logits again in backward). A sequence-level
    loss (gspo) takes the op's composed path by itself. `fused=False` is that composed path, kept as the
    reference the tests compare against (tests/rl/test_fused_policy_step.py).
    """
    cfg = loss_config(rl_cfg)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        hidden = model_forward(model, mb)

        def loss_func(output):
            behavior = mb.behavior_logprobs if cfg.tis_cap else None
            if fused:
                b, r = mb.response_index.shape
                rows = (torch.arange(b, device=output.device) // mb.answers_per_row).unsqueeze(1)
                targets = (mb.response_labels if mb.response_labels is not None
                           else mb.labels[rows, mb.response_index])
                loss, m, ent = ops.fused_grpo_loss(
                    output[rows, mb.response_index], output_weight(unwrap(model)), targets, mb.old_logprobs,
                    mb.advantages, mb.response_mask, ref_logprobs=mb.ref_logprobs, policy_loss=cfg,
                    behavior_logprobs=behavior, temperature=temperature, tp_group=_tp_group(),
                    return_entropy=True)
            else:
                lp, ent = response_logprobs(output, unwrap(model), mb, temperature, entropy=True)
                old = mb.old_logprobs if mb.old_logprobs is not None else lp.detach()
                loss, m = ops.grpo_policy_loss(lp, old, mb.advantages, mb.response_mask, ref_logprobs=mb.ref_logprobs,
                                           policy_loss=cfg, behavior_logprobs=behavior)
            loss = loss * mb.loss_scale
            mask = mb.response_mask
            ent_mean = (ent.detach() * mask).sum() / mask.sum().clamp_min(1.0)
            metrics = {"loss": loss.detach().clone(), "entropy": ent_mean}
            for k, v in m.items():
                metrics[k] = float(v)
            return loss, metrics

        return hidden, loss_func

    return forward_step
