"""A tiny GRPO config shared by the RL tests."""
from megatron_r1.config import config_from_dict
from tests.presets import tiny_deepseek_v3

TINY = tiny_deepseek_v3(seq_length=128, max_position_embeddings=160)


def grpo_config(tmp, overrides=(), **sections):
    """The tiny GRPO run's config under `tmp`; a section given as a dict is merged into the default one (one level),
    anything else replaces it, and None drops it (the field's default applies)."""
    base = {
        "stage": "grpo", "model": dict(TINY), "tokenizer": {"path": "builtin:demo"},
        "data": {"source": "builtin:demo_arithmetic", "template": "plain", "options": {"num_samples": 64, "seed": 1}},
        "training": {"train_steps": 3, "micro_batch_size": 16, "global_batch_size": 16, "seed": 5},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "rl": {"prompts_per_step": 4, "group_size": 4, "max_prompt_length": 16, "max_response_length": 8,
               "mini_batch_size": 16, "kl_coef": 0.0},
        "generation": {"temperature": 1.0, "max_batch_size": 16},
        "rewards": [{"name": "tests.rl.plugin_rewards:says_think"}],
        "logging": {"run_dir": f"{tmp}/run", "progress": False, "plots": False},
        "checkpoint": {"save": f"{tmp}/ckpt", "save_interval": 0},
    }
    for k, v in sections.items():
        if v is None:
            base.pop(k, None)
        else:
            base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(base, list(overrides))
