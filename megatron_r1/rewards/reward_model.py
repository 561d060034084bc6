"""The `reward_model` reward: a trained reward model's score of (prompt, completion), for R1's all-scenario RL.

The model and its Bradley–Terry training live in `megatron_r1/reward_model/`; this module only scores with it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from megatron_r1.config import config_from_dict
from megatron_r1.data.templates import get_template
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.errors import ConfigError
from megatron_r1.reward_model.model import build_reward_model, encode_pairs
from megatron_r1.rewards.registry import register_reward


@register_reward("reward_model")
class RewardModelScorer:
    """Reward = the trained reward model's score of (prompt, completion). Every TP rank must call it together.

    Options: `checkpoint` (a reward-model checkpoint directory; its config.yaml gives model and tokenizer),
    `scale` and `shift` (applied to the raw score), `batch_size`.
    """

    def __init__(self, checkpoint: str, scale: float = 1.0, shift: float = 0.0, batch_size: int = 32):
        import yaml

        from megatron_r1.checkpoint import checkpoint_config_yaml, load_model_only

        text = checkpoint_config_yaml(checkpoint)
        if text is None:
            raise ConfigError(f"reward 'reward_model': {checkpoint} has no config.yaml "
                              "(not a reward-model checkpoint?)")
        cfg = config_from_dict(yaml.safe_load(text), source=str(Path(checkpoint) / "config.yaml"))
        self.cfg = cfg
        self.model = build_reward_model(cfg)
        load_model_only(self.model, checkpoint)
        self.model.eval()
        self.tokenizer = load_tokenizer(cfg.tokenizer.path)
        self.template = get_template(cfg.data.template)
        self.scale, self.shift, self.batch_size = scale, shift, batch_size

    @torch.no_grad()
    def scores(self, prompts: list[str], completions: list[str]) -> list[float]:
        out = []
        device = next(self.model.parameters()).device
        for s in range(0, len(prompts), self.batch_size):
            pairs = list(zip(prompts[s:s + self.batch_size], completions[s:s + self.batch_size]))
            tokens, pos, last = encode_pairs(self.tokenizer, self.template, pairs, self.cfg.model.seq_length)
            out += self.model(tokens.to(device), pos.to(device), None, last.to(device)).tolist()
        return [self.scale * v + self.shift for v in out]

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        return self.scores([s["prompt"] for s in samples], completions)
