"""The neural reward model: Bradley–Terry training beats chance on held-out pairs, and it scores as a reward."""
import json

import pytest

from megatron_r1.config import config_from_dict
from tests.distributed import run_distributed
from tests.rl.common import TINY


def _train_and_score(rank, world, tmp):
    from megatron_r1.rewards import get_reward
    from megatron_r1.reward_model.trainer import run_reward_model

    cfg = config_from_dict({
        "stage": "reward_model", "model": dict(TINY, seq_length=96), "tokenizer": {"path": "builtin:demo"},
        "data": {"source": "builtin:preferences", "template": "plain", "options": {"num_samples": 600, "seed": 3}},
        "training": {"train_steps": 30, "micro_batch_size": 16, "global_batch_size": 16, "seed": 3},
        "optimizer": {"lr": 2e-3, "lr_warmup_steps": 2},
        "logging": {"run_dir": f"{tmp}/run", "progress": False, "plots": False},
        "checkpoint": {"save": f"{tmp}/ckpt"},
    })
    run_reward_model(cfg)
    reward = get_reward("reward_model", checkpoint=f"{tmp}/ckpt")
    prompts = [{"prompt": "What is 12 + 30?"}, {"prompt": "What is 12 + 30?"}]
    good, bad = reward([" <think> 12 + 30 = 42 </think> <answer> 42 </answer>", " I don't know."], prompts)
    return good, bad


@pytest.mark.slow
def test_reward_model_learns_preferences_and_scores(tmp_path):
    ((good, bad),) = run_distributed(_train_and_score, 1, str(tmp_path))
    ev = json.loads((tmp_path / "run" / "reward_model_eval.json").read_text())
    assert ev["heldout_pairs"] > 50
    assert ev["pairwise_accuracy"] > 0.75, ev  # chance is 0.5
    assert good > bad
