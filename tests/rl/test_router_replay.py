"""rl.router_replay: with the trainer's routers perturbed after generation, replaying the engine's recorded routing
gives the engine's log-probs (padded and shared-prefix rows, several micro-batches) and the same gradients with
activation recompute; without replay they differ, and rl/routing_mismatch counts the pairs that differ."""
import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.logging.metrics import read_metrics
from megatron_r1.rl.batch import RolloutBatch, collate, collate_shared_prefix
from tests.distributed import run_distributed
from tests.rl.common import TINY, grpo_config

G = 2
MODEL = {**TINY, "num_layers": 3}  # layers 1 and 2 are MoE: the record's layer axis is mapped, not assumed


def _config(recompute: bool = False):
    from megatron_r1.config import config_from_dict

    return config_from_dict({"stage": "grpo", "model": dict(MODEL),
                             "training": {"micro_batch_size": G, "global_batch_size": G, "precision": "fp32",
                                          "recompute_activations": recompute},
                             "rl": {"group_size": G, "mini_batch_size": 3 * G, "prompts_per_step": 3,
                                    "kl_coef": 0.0, "router_replay": True},
                             "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "lr_warmup_steps": 0,
                                           "lr_decay_style": "constant"}}, [])


def _rollouts(engine, vocab: int) -> RolloutBatch:
    """3 groups of G sampled answers (prompts of 6, 3 and 9 tokens) with the engine's log-probs and routing."""
    from megatron_r1.inference import SamplingParams

    g = torch.Generator().manual_seed(0)
    prompts = [p for n in (6, 3, 9) for p in [torch.randint(3, vocab, (n,), generator=g).tolist()] * G]
    results = engine.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=7, seed=i)
                                        for i in range(len(prompts))])
    n = len(prompts)
    return RolloutBatch(prompt_tokens=prompts, response_tokens=[r.token_ids for r in results],
                        behavior_logprobs=[r.logprobs for r in results], texts=[""] * n, samples=[{}] * n,
                        finish_reasons=[r.finish_reason for r in results], group_size=G,
                        advantages=torch.linspace(-1.0, 1.0, n), routing=[r.routing for r in results],
                        routing_layers=tuple(engine.routing_layers))


def _perturb_routers(model, seed: int = 1):
    """Move every expert bias: it steers the top-k choice only, so replayed routing reproduces the engine exactly
    while the trainer's own choice changes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.add_(torch.randn(b.shape, generator=g) * 0.5)


def _logprobs_with_and_without_replay(rank, world):
    from megatron_r1.inference import Engine
    from megatron_r1.models.builder import build_model
    from megatron_r1.models.router_replay import RoutingMismatch, install, routing_replay
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.policy_forward import compute_logprobs

    cfg = _config()
    ctx = init_parallel(cfg.parallel, 3)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    engine = Engine(model, max_batch_size=8, max_seq_len=64, record_routing=True)
    rb = _rollouts(engine, cfg.model.vocab_size)
    install(model)
    out: dict = {"layers": rb.routing_layers}
    for layout, fn in (("plain", collate), ("packed", collate_shared_prefix)):
        pb = fn(rb, pad_id=0)
        if layout == "plain":  # before the perturbation the trainer routes as the engine did
            before = RoutingMismatch()
            with routing_replay([model], replay=False, measure=before):
                compute_logprobs([model], pb, G, 1.0, ctx.device)
            out["before"] = before.fraction()
            _perturb_routers(model)
        for replay in (True, False):
            m = RoutingMismatch()
            with routing_replay([model], replay=replay, measure=m):
                lp = compute_logprobs([model], pb, G, 1.0, ctx.device)  # 3 micro-batches of G answers
            diff = ((lp - pb.behavior_logprobs) * pb.response_mask).abs().max().item()
            out[(layout, replay)] = (diff, m.fraction())
    # outside a replay block the record is ignored: the trainer's own (perturbed) routing
    lp = compute_logprobs([model], collate(rb, pad_id=0), G, 1.0, ctx.device)
    out["outside"] = ((lp - collate(rb, 0).behavior_logprobs) * collate(rb, 0).response_mask).abs().max().item()
    return out


@pytest.mark.slow
def test_replay_gives_the_engines_logprobs_and_no_replay_does_not():
    (out,) = run_distributed(_logprobs_with_and_without_replay, 1)
    print(f"\n(layout, replay): (max |trainer - engine| log-prob, routing mismatch): {out}")
    assert out["layers"] == (1, 2)
    assert out["before"] == 0.0
    for layout in ("plain", "packed"):
        replayed, replay_mismatch = out[(layout, True)]
        free, free_mismatch = out[(layout, False)]
        assert replayed < 2e-5, (layout, replayed)  # the engine-vs-trainer tolerance of tests/inference
        assert free > 1e-3, (layout, free)
        # the mismatch is the trainer's own routing against the record, replayed or not: the same count
        assert 0.05 < replay_mismatch < 1.0 and replay_mismatch == free_mismatch, out
    assert out["outside"] > 1e-3


def _replayed_gradients(rank, world, recompute: bool, init_dir: str):
    from megatron_r1.checkpoint import load_model_only, save_model_only
    from megatron_r1.inference import Engine
    from megatron_r1.models.router_replay import install, routing_replay
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.policy_forward import hidden_mode, make_policy_loss_step, micro_batches
    from megatron_r1.training.setup import build_train_state, unwrap
    from megatron_r1.training.step import train_step

    cfg = _config(recompute)
    ctx = init_parallel(cfg.parallel, 3)
    if recompute and not torch.cuda.is_available():
        # Megatron's CheckpointFunction saves and restores the CUDA RNG state, which a CPU process has none of;
        # these models draw no random numbers in forward (no dropout), so there is nothing to restore
        from megatron.core.tensor_parallel import random as mp_random

        mp_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0)
        mp_random._set_cuda_rng_state = lambda *a, **k: None
    state = build_train_state(cfg, ctx, 10)
    model = unwrap(state.model[0])
    if recompute:
        load_model_only(model, init_dir)
    else:
        save_model_only(model, init_dir)
    engine = Engine(model, max_batch_size=8, max_seq_len=64, record_routing=True)
    rb = _rollouts(engine, cfg.model.vocab_size)
    _perturb_routers(model)
    install(state.model[0])
    pb = collate(rb, pad_id=0)
    pb.old_logprobs = pb.behavior_logprobs.clone()
    with hidden_mode(state.model), routing_replay(state.model, replay=True):
        result = train_step(state, make_policy_loss_step(cfg.rl, 1.0), micro_batches(pb, G, ctx.device), 3,
                            pb.tokens.shape[1], G)
    return {"loss": result.loss, "metrics": result.metrics,
            "grads": {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.slow
def test_activation_recompute_replays_in_backward_too(tmp_path):
    """The recomputed forward in backward routes by the record as well (Megatron's REPLAY_BACKWARD queue):
    otherwise its gradients would belong to another routing than the forward's."""
    (plain,) = run_distributed(_replayed_gradients, 1, False, str(tmp_path / "init"))
    (recomputed,) = run_distributed(_replayed_gradients, 1, True, str(tmp_path / "init"))
    # the replayed old log-probs are the engine's: the ratio is 1 on every token
    assert plain["metrics"]["clip_frac_low"] == plain["metrics"]["clip_frac_high"] == 0.0
    assert abs(plain["loss"] - recomputed["loss"]) < 1e-6
    for k, g in plain["grads"].items():
        scale = float(g.abs().max())
        assert float((recomputed["grads"][k] - g).abs().max()) <= 1e-5 * scale + 1e-9, k


def test_router_replay_needs_an_moe_model(tmp_path):
    with pytest.raises(ConfigError, match="rl.router_replay"):
        grpo_config(tmp_path, ["rl.router_replay=true"], model={"preset": "llama_tiny"})


def _run(rank, world, tmp, overrides):
    from megatron_r1.rl.trainer import run_grpo

    return run_grpo(grpo_config(tmp, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_grpo_step_with_router_replay_logs_the_mismatch(tmp_path, shared_prefix):
    # two mini-batches: old log-probs are recomputed (replayed), then two replayed updates
    overrides = ["training.train_steps=1", "rl.router_replay=true", "rl.mini_batch_size=8",
                 "training.micro_batch_size=4", "training.global_batch_size=4", f"rl.shared_prefix={shared_prefix}"]
    (last,) = run_distributed(_run, 1, str(tmp_path), overrides)
    assert 0.0 <= last["rl/routing_mismatch"] < 0.05  # same weights as the rollout: (almost) no token differs
    rows = [r for r in read_metrics(tmp_path / "run") if "rl/routing_mismatch" in r]
    assert len(rows) == 1 and "loss" in rows[0]
