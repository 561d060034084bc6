"""GRPO with expert parallelism across data-parallel ranks: EP=2 over DP=2 (each DP rank its own prompts) equals the
same two DP ranks without EP. The in-engine generator replicates tokens over the expert group, so every rank must run
every DP rank's requests; without that the ranks' different batches meet in the experts' all-reduce."""
import pytest
import torch

from tests.distributed import run_distributed
from tests.rl.common import grpo_config

pytestmark = pytest.mark.slow

STEP = ["training.train_steps=1", "checkpoint.finetune=true", "checkpoint.load_optimizer=false", "rl.kl_coef=0.01",
        "optimizer.adam_eps=1e-3",  # see tests/rl/test_grpo_pipeline.py: a smooth first Adam step
        "rewards=[{name: 'tests.rl.plugin_rewards:starts_a_to_m'}]"]


def _save_init(rank, world, tmp):
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    cfg = grpo_config(tmp)
    init_parallel(cfg.parallel, 3)
    save_model_only(build_model(cfg.model, cfg.parallel, "fp32"), f"{tmp}/init")


def _one_step(rank, world, tmp, name, layout):
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.inference.weights import full_state_dict
    from megatron_r1.models import build_model
    from megatron_r1.rl.trainer import run_grpo

    cfg = grpo_config(f"{tmp}/{name}", [*layout, f"checkpoint.load={tmp}/init", *STEP])
    metrics = run_grpo(cfg)
    model = build_model(cfg.model, cfg.parallel, "fp32")
    load_model_only(model, cfg.checkpoint.save)
    full = full_state_dict(model)
    return metrics, ({k: v.clone() for k, v in full.items()} if rank == 0 else None)


def test_one_rl_step_at_ep2_equals_ep1_over_two_dp_ranks(tmp_path):
    """The reference: the same two DP ranks without EP (each rank's experts whole, nothing to replicate)."""
    run_distributed(_save_init, 1, str(tmp_path))
    (m1, w1), (m1b, _) = run_distributed(_one_step, 2, str(tmp_path), "ep1", [])
    (m2, w2), (m2b, _) = run_distributed(_one_step, 2, str(tmp_path), "ep2", ["parallel.expert_model_parallel_size=2"])
    assert m1["reward"] == m2["reward"] and m1b["reward"] == m2b["reward"]  # the same rollouts on each DP rank
    assert m1["response_length/mean"] == m2["response_length/mean"]
    assert m1b["response_length/mean"] == m2b["response_length/mean"]
    assert m1["grad_norm"] > 1e-3
    assert abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4 * m1["grad_norm"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
