"""The trainer's policy update goes through ops.fused_grpo_loss (3 matmuls over tokens × vocab); its loss, metrics,
entropy and every parameter's gradient equal the composed path (token_logprobs + grpo_policy_loss, the trainer's
loss before) for each token-level loss, gspo, on- and off-policy, plain and shared-prefix rows."""
import pytest
import torch

from megatron_r1.rl.batch import collate, collate_shared_prefix
from tests.distributed import run_distributed
from tests.rl.test_micro_batches import _plain
from tests.rl.test_shared_prefix import G, model_config, rollouts

CASES = [  # (policy_loss, off-policy old log-probs, shared-prefix rows, tis_cap)
    ("clip", False, False, None), ("clip", True, False, None), ("clip", True, True, 2.0),
    ("dual_clip", True, False, None), ("cispo", True, True, None), ("gspo", True, False, None),
    ("clip", False, True, None),
]


def _run(rank, world):
    from megatron_r1.config import config_from_dict
    from megatron_r1.models.builder import build_model
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl import policy_forward
    from megatron_r1.rl.policy_forward import compute_logprobs, hidden_mode, make_policy_loss_step, micro_batches
    from megatron_r1.training.setup import build_train_state, unwrap
    from megatron_r1.training.step import train_step

    base = model_config("llama_tiny")
    ctx = init_parallel(base.parallel, 5)
    init = {k: v.clone() for k, v in build_model(base.model, base.parallel, "fp32").state_dict().items()
            if isinstance(v, torch.Tensor)}
    rb = rollouts(vocab=base.model.vocab_size, seed=1)
    state = build_train_state(base, ctx, 100)
    model = unwrap(state.model[0])
    # count the fused op's calls: the trainer's step must reach it
    import megatron_r1.ops as ops_mod
    calls = {"n": 0}
    real = ops_mod.fused_grpo_loss

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    out = {}
    for case in CASES:
        loss_name, off, packed, tis = case
        cfg = config_from_dict({**_plain(base), "rl": {**_plain(base)["rl"], "policy_loss": loss_name,
                                                        "kl_coef": 0.05, "tis_cap": tis, "max_response_length": 12,
                                                        "shared_prefix": packed}}, [])
        pb = (collate_shared_prefix if packed else collate)(rb, pad_id=0)
        mbs = G if packed else 2
        model.load_state_dict(init, strict=False)
        lp = compute_logprobs(state.model, pb, mbs, 0.9, ctx.device)
        n = torch.arange(lp.numel(), dtype=lp.dtype).view_as(lp)
        pb.old_logprobs = lp + 0.3 * torch.sin(n) if off else None
        pb.ref_logprobs = lp - 0.05 * torch.cos(n)
        pb.behavior_logprobs = lp + 0.2 * torch.cos(2 * n) if tis else None
        for fused in (True, False):
            model.load_state_dict(init, strict=False)
            for p in model.parameters():
                if getattr(p, "main_grad", None) is not None:
                    p.main_grad.zero_()
            ops_mod.fused_grpo_loss = counting
            before = calls["n"]
            try:
                with hidden_mode(state.model):
                    plan = policy_forward.plan_micro_batches(pb, mbs)
                    result = train_step(state, make_policy_loss_step(cfg.rl, 0.9, fused=fused),
                                        micro_batches(pb, mbs, ctx.device, cfg.rl.loss_agg, plan=plan), len(plan),
                                        pb.tokens.shape[1], pb.rows(mbs))
            finally:
                ops_mod.fused_grpo_loss = real
            grads = {k: p.main_grad.clone() for k, p in model.named_parameters() if p.requires_grad}
            out[(case, fused)] = {"loss": result.loss, "metrics": dict(result.metrics), "grads": grads,
                                  "fused_calls": calls["n"] - before, "n_micro": len(plan)}
    return out


@pytest.mark.slow
def test_trainer_update_is_the_fused_loss_with_the_composed_paths_numbers():
    (out,) = run_distributed(_run, 1)
    for case in CASES:
        f, c = out[(case, True)], out[(case, False)]
        assert f["fused_calls"] == f["n_micro"] >= 1 and c["fused_calls"] == 0, case
        assert f["loss"] == pytest.approx(c["loss"], rel=1e-5, abs=1e-7), case
        for k in ("entropy", "clip_frac_low", "clip_frac_high", "kl_mean", "ratio_mean"):
            if k in c["metrics"]:
                assert f["metrics"][k] == pytest.approx(c["metrics"][k], rel=1e-5, abs=1e-6), (case, k)
        assert "entropy" in f["metrics"]
        nonzero = 0
        for k, g in c["grads"].items():
            scale = float(g.abs().max())
            nonzero += scale > 0
            assert float((f["grads"][k] - g).abs().max()) <= 1e-5 * scale + 1e-9, (case, k)
        assert nonzero > 5, case
