"""DeepSeek-R1-Zero's GRPO (`stage: grpo`), read top to bottom like the paper:

    sample G answers per prompt -> score with rule rewards -> group-normalised advantages
    -> old log-probs (trainer recompute) and reference log-probs (frozen model)
    -> μ epochs of clipped policy-gradient mini-batch updates with a KL penalty -> refit the generator.

The generator is the in-engine `megatron_r1.inference.Engine` reading the policy's own parameters, so "refit" is
a version bump, not a copy; nothing on the loop's path goes through disk or HTTP.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch

from megatron_r1.config import Config
from megatron_r1.errors import ConfigError
from megatron_r1.logging import get_logger
from megatron_r1.models.builder import build_model, uses_transformer_engine
from megatron_r1.ops import AdvantageOptions, compute_advantages
from megatron_r1.rewards import CombinedReward, RewardSpec
from megatron_r1.rl.batch import RolloutBatch, collate, collate_shared_prefix
from megatron_r1.rl.policy_forward import (
    compute_logprobs,
    hidden_mode,
    make_policy_loss_step,
    micro_batches,
    padding_fraction,
    plan_micro_batches,
)
from megatron_r1.rl.rollout import informative_groups, reflection_rate, sample_group_rollouts, score_rollouts
from megatron_r1.training.lm_data import EpochOrder
from megatron_r1.training.loop import resume_or_init, run_loop
from megatron_r1.training.prologue import start_stage
from megatron_r1.training.setup import build_train_state
from megatron_r1.training.step import train_step

log = get_logger()


class Timer:
    """Wall time per phase of a step (generate / reward / logprobs / update / refit)."""

    def __init__(self):
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


class PromptSampler:
    """Deterministic prompt order (a seeded permutation per epoch); the position alone resumes it exactly."""

    def __init__(self, samples: list, seed: int):
        self.samples = samples
        self.order = EpochOrder(len(samples), seed * 7919)

    def take(self, start: int, count: int) -> list:
        return [self.samples[self.order(i)] for i in range(start, start + count)]


def capture_init_rng():
    """The random state the policy's weights are drawn from, so the reference can be rebuilt identically later."""
    from megatron_r1.checkpoint import rng

    return rng.capture()


def build_reference(cfg: Config, policy_model, fresh_start: bool, init_rng):
    """The frozen reference policy: the weights RL started from — `checkpoint.load` when given; otherwise the
    policy's own initial weights (copied at a fresh start, re-drawn from the captured init RNG on resume)."""
    from megatron_r1.checkpoint import rng

    if cfg.checkpoint.load or fresh_start:
        ref = build_model(cfg.model, cfg.parallel, cfg.training.precision)
        if cfg.checkpoint.load:
            from megatron_r1.checkpoint import load_model_only

            load_model_only(ref, cfg.checkpoint.load)
        else:
            ref.load_state_dict(policy_model.state_dict(), strict=False)
    else:
        now = rng.capture()
        rng.restore(init_rng)
        ref = build_model(cfg.model, cfg.parallel, cfg.training.precision)
        rng.restore(now)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    if cfg.rl.reference_offload and torch.cuda.is_available():
        ref.cpu()
    return ref


@contextlib.contextmanager
def on_device(model, offload: bool):
    """Bring an offloaded reference model to the GPU for its forward pass, and back."""
    if offload and torch.cuda.is_available():
        model.cuda()
        try:
            yield model
        finally:
            model.cpu()
    else:
        yield model


def advantages_for(batch: RolloutBatch, rl, dp_group=None) -> torch.Tensor:
    """Advantages [N] by `rl.advantage_estimator` with the configured std, eps and groups-of-one rule; the
    REINFORCE++ batch normalisation weighs answers by their response tokens and spans every DP rank."""
    opts = AdvantageOptions(std=rl.advantage_std, eps=rl.advantage_eps, singleton=rl.singleton_advantage)
    lengths = torch.tensor([len(r) for r in batch.response_tokens], dtype=torch.float32)
    return compute_advantages(batch.rewards, batch.group_size, rl.advantage_estimator, opts, lengths, dp_group)


CONVENTION_FIELDS = ("advantage_estimator", "advantage_std", "advantage_eps", "singleton_advantage", "policy_loss",
                     "loss_agg", "max_response_length", "clip_low", "clip_high", "clip_ratio_c", "kl_coef",
                     "kl_estimator", "kl_clamp", "tis_cap", "tis_on_kl", "tis_level", "dynamic_sampling",
                     "router_replay")


def conventions(cfg: Config) -> dict:
    """Every choice that makes this GRPO differ from another (docs/rl_conventions.md), as logged at start."""
    out = {f"rl.{k}": getattr(cfg.rl, k) for k in CONVENTION_FIELDS}
    out["training.micro_batch_size"] = cfg.training.micro_batch_size
    out["training.max_tokens_per_micro_batch"] = cfg.training.max_tokens_per_micro_batch
    return out


def collect_rollouts(engine, tokenizer, template, sampler: PromptSampler, state, cfg: Config, rewards, timer: Timer,
                     dp_rank: int, dp_size: int, dp_group=None) -> tuple[RolloutBatch, dict]:
    """B prompts × G answers for this DP rank, scored; with dynamic sampling, uninformative groups are replaced by
    fresh prompts (up to `max_refill_rounds`)."""
    rl = cfg.rl
    per_rank = rl.prompts_per_step // dp_size
    counters = {"reward_errors": 0, "reward_timeouts": 0, "truncated_rate": 0.0, "dropped_groups": 0}
    kept: list[RolloutBatch] = []
    have, rounds = 0, 0
    while have < per_rank:
        want = per_rank - have
        start = state.consumed_samples + dp_rank * want
        prompts = sampler.take(start, want)
        state.consumed_samples += want * dp_size
        seed = cfg.training.seed + 1000 * state.step + 97 * rounds + dp_rank
        with timer("generate"):
            batch = sample_group_rollouts(engine, tokenizer, template, prompts, rl.group_size, cfg.generation,
                                          rl.max_response_length, seed)
        with timer("reward"):
            c = score_rollouts(batch, rewards, rl.overlong_penalty)
        counters["reward_errors"] += c["reward_errors"]
        counters["reward_timeouts"] += c["reward_timeouts"]
        counters["truncated_rate"] = c["truncated_rate"]
        if rl.dynamic_sampling and rounds < rl.max_refill_rounds:
            groups = informative_groups(batch.rewards, rl.group_size)
            counters["dropped_groups"] += want - len(groups)
            idx = [g * rl.group_size + j for g in groups for j in range(rl.group_size)]
            if idx:
                kept.append(batch.select(idx))
            have += len(groups)
            rounds += 1
        else:
            kept.append(batch)
            have += want
    batch = RolloutBatch.concat(kept) if len(kept) > 1 else kept[0]
    batch.advantages = advantages_for(batch, rl, dp_group)
    return batch, counters


def rollout_metrics(batch: RolloutBatch, cfg: Config) -> dict:
    lengths = torch.tensor([len(r) for r in batch.response_tokens], dtype=torch.float32)
    m = {"reward": float(batch.rewards.mean()), "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
         "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
         "reflection_rate": reflection_rate(batch.texts, cfg.rl.reflection_words)}
    for name, values in batch.components.items():
        m[f"reward/{name}"] = sum(values) / max(1, len(values))
    if "accuracy" in batch.components:
        m["accuracy"] = m["reward/accuracy"]
    if "format" in batch.components:
        m["format_rate"] = m["reward/format"]
    return m


def build_engine(cfg: Config, policy_model, tokenizer):
    """The rollout engine on the policy's own parameters; an MoE policy's engine records its routing (for
    rl.router_replay and the rl/routing_mismatch metric)."""
    from megatron_r1.inference import Engine

    max_len = cfg.rl.max_prompt_length + cfg.rl.max_response_length + 1
    return Engine(policy_model, tokenizer=tokenizer,
                  max_batch_size=min(cfg.generation.max_batch_size, cfg.rl.prompts_per_step * cfg.rl.group_size),
                  max_seq_len=max_len, cuda_graphs=cfg.generation.cuda_graphs, kv_cache=cfg.generation.kv_cache,
                  kv_block_size=cfg.generation.kv_block_size, kv_cache_blocks=cfg.generation.kv_cache_blocks,
                  kv_cache_memory_gb=cfg.generation.kv_cache_memory_gb,
                  record_routing=bool(cfg.model.num_experts))


def check_shared_prefix(cfg: Config, dp_size: int) -> None:
    """What `rl.shared_prefix` needs beyond the config file: whole groups per DP rank's mini-batch, and the local
    attention module (it takes an arbitrary mask; Transformer Engine's spec is not verified to)."""
    rl = cfg.rl
    if not rl.shared_prefix:
        return
    if uses_transformer_engine(cfg.model):
        # Why not TE (read in megatron-core 0.16.1 and TE 2.20.2): Megatron's GPT specs build attention with
        # attn_mask_type=causal, and TEDotProductAttention hands TE that type, for which TE takes no mask, so
        # the answers of a packed row would see each other; TE's "arbitrary" mask type runs only on its unfused
        # backend, which materialises the [b, h, S, S] scores that the packed layout exists to avoid.
        p, l, g = rl.max_prompt_length, rl.max_response_length, rl.group_size
        raise ConfigError(
            "rl.shared_prefix: needs the local core attention (block attention over [prompt, answer_1..G] rows); "
            "the Transformer Engine spec (model.transformer_impl resolves to transformer_engine here) builds "
            "attention with attn_mask_type=causal, for which TE ignores the mask, and TE's arbitrary masks run "
            "only on its unfused [S, S] backend. Set rl.shared_prefix=false (one padded row per answer: up to "
            f"{g}x({p}+{l}) = {g * (p + l)} tokens per group through the update instead of {p}+{g}x{l} = "
            f"{p + g * l}, x{g * (p + l) / (p + g * l):.2f}; a 1.9x slower step in docs/bench_grpo_step.md) or "
            "model.transformer_impl=local / te_standin")
    mini_per_rank = rl.mini_batch_size // dp_size
    if mini_per_rank % rl.group_size:
        raise ConfigError(f"rl.mini_batch_size: {rl.mini_batch_size} answers over {dp_size} data-parallel ranks is "
                          f"{mini_per_rank} per rank, not a multiple of rl.group_size ({rl.group_size}), which "
                          f"rl.shared_prefix needs (one row per group)")


def run_grpo(cfg: Config) -> dict:
    """Run GRPO for `training.train_steps` RL steps (resumable); return the last step's metrics."""
    rl, t = cfg.rl, cfg.training
    # With PP > 1 every stage generates the same rollouts (its own layers; the last stage samples) and scores them,
    # so each stage holds the whole batch its schedule's micro-batches are cut from.
    stage = start_stage(cfg)
    ctx, tokenizer, template = stage.ctx, stage.tokenizer, stage.template
    if rl.prompts_per_step % ctx.dp_size:
        raise ConfigError(f"rl.prompts_per_step: {rl.prompts_per_step} is not divisible by the data-parallel size "
                          f"{ctx.dp_size}")
    check_shared_prefix(cfg, ctx.dp_size)
    if ctx.is_logging_rank:
        log.info("GRPO conventions (docs/rl_conventions.md): %s",
                 ", ".join(f"{k}={v}" for k, v in conventions(cfg).items()))
    prompts = stage.samples("train")
    rewards = CombinedReward([RewardSpec(r.name, r.weight, dict(r.options)) for r in cfg.rewards])

    answers_per_rank = rl.prompts_per_step * rl.group_size // ctx.dp_size
    mini_per_rank = max(1, rl.mini_batch_size // ctx.dp_size)
    opt_steps_per_rl_step = rl.ppo_epochs * math.ceil(answers_per_rank / mini_per_rank)
    init_rng = capture_init_rng()
    state = build_train_state(cfg, ctx, t.train_steps * opt_steps_per_rl_step)
    resume_or_init(state)
    policy = state.unwrapped[0]
    reference = None
    if rl.kl_coef > 0:
        reference = build_reference(cfg, policy, fresh_start=state.step == 0, init_rng=init_rng)
    engine = build_engine(cfg, policy, tokenizer)
    moe = bool(cfg.model.num_experts)
    if moe:  # the policy's routers replay (rl.router_replay) or only compare with the rollout's routing
        from megatron_r1.models.router_replay import RoutingMismatch, install, routing_replay

        for chunk in state.model:
            install(chunk)
    sampler = PromptSampler(prompts, t.seed)
    mbs, max_tokens = t.micro_batch_size, t.max_tokens_per_micro_batch
    dp_group = None
    if ctx.dp_size > 1:
        from megatron.core import parallel_state as ps

        dp_group = ps.get_data_parallel_group()
    # On-policy shortcut: with one epoch over one mini-batch the "old" policy is the current one, so the trainer's
    # recompute equals the gradient pass's own log-probs (ratio = 1 exactly); skip that extra forward.
    need_old = rl.ppo_epochs > 1 or mini_per_rank < answers_per_rank

    def one_step(state) -> dict:
        timer = Timer()
        batch, counters = collect_rollouts(engine, tokenizer, template, sampler, state, cfg, rewards, timer,
                                           ctx.dp_rank, ctx.dp_size, dp_group)
        metrics = rollout_metrics(batch, cfg)
        # Sequence parallelism splits the sequence over the TP ranks: pad it to a multiple of TP.
        pb = (collate_shared_prefix if rl.shared_prefix else collate)(batch, tokenizer.pad_id, max_response=None,
                                                                       pad_multiple=ctx.tp_size)
        # routing mismatch: counted in the first policy pass over the batch (old log-probs, or the on-policy
        # update), before any optimizer step of this RL step
        mismatch = RoutingMismatch() if moe and pb.routing is not None else None

        def replaying(measure):
            if mismatch is None or not (rl.router_replay or measure is not None):
                return contextlib.nullcontext()
            return routing_replay(state.model, rl.router_replay, measure)

        with timer("logprobs"):
            if need_old:
                with replaying(mismatch):
                    pb.old_logprobs = compute_logprobs(state.model, pb, mbs, cfg.generation.temperature,
                                                       ctx.device, max_tokens)
            if reference is not None:
                with on_device(reference, rl.reference_offload):
                    pb.ref_logprobs = compute_logprobs([reference], pb, mbs, cfg.generation.temperature, ctx.device,
                                                       max_tokens)
        n = len(pb)
        step_metrics: list[dict] = []
        skipped = 0
        with timer("update"):
            for _ in range(rl.ppo_epochs):
                for start in range(0, n, mini_per_rank):
                    mini = pb.slice(start, min(n, start + mini_per_rank))
                    plan = plan_micro_batches(mini, mbs, max_tokens)
                    with hidden_mode(state.model), replaying(None if need_old else mismatch):
                        # with PP the stages exchange each micro-batch's own shape (variable_seq_lengths), so
                        # the schedule's sequence length / micro-batch size are nominal
                        result = train_step(state, make_policy_loss_step(rl, cfg.generation.temperature),
                                            micro_batches(mini, mbs, ctx.device, rl.loss_agg, plan=plan), len(plan),
                                            mini.tokens.shape[1], mini.rows(mbs))
                    skipped += int(result.skipped)
                    step_metrics.append({"grad_norm": result.grad_norm, "lr": result.lr,
                                         "padding_fraction": padding_fraction(mini, plan),
                                         "micro_batches": float(len(plan)), **result.metrics})
        with timer("refit"):
            engine.refit()
        state.step += 1
        gen_tokens = float(pb.response_mask.sum())
        train_tokens = float(batch.sequence_tokens()) * rl.ppo_epochs  # each response token once (it is in there)
        for key in step_metrics[0] if step_metrics else []:
            vals = [m[key] for m in step_metrics if key in m and math.isfinite(m[key])]
            if vals:
                metrics[key] = sum(vals) / len(vals)
        if "kl_mean" in metrics:
            metrics["kl"] = metrics.pop("kl_mean")
        metrics.update(counters)
        if mismatch is not None:
            frac = mismatch.fraction()
            if frac is not None:
                metrics["rl/routing_mismatch"] = frac
        metrics["skipped_steps"] = float(skipped)
        for name, secs in timer.times.items():
            metrics[f"time/{name}_s"] = secs
        metrics["gen_tokens_per_s"] = gen_tokens / max(timer.times.get("generate", 0.0), 1e-9)
        metrics["train_tokens_per_s"] = train_tokens / max(timer.times.get("update", 0.0), 1e-9)
        if skipped:
            log.warning("step %d: %d optimizer step(s) skipped (non-finite loss or gradients); weights kept",
                        state.step, skipped)
        return metrics

    try:
        return run_loop(state, t.train_steps, one_step, desc="grpo")
    finally:
        if hasattr(rewards, "close"):
            rewards.close()
