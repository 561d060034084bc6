"""The neural reward model of R1's all-scenario RL stage: the Megatron model with a scalar head on the last token.

Trained with the Bradley–Terry pairwise loss on (prompt, chosen, rejected) preferences (`stage: reward_model`,
`reward_model/trainer.py`); scored through the `reward_model` reward (`rewards/reward_model.py`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_r1.models import build_model
from megatron_r1.models.heads import hidden_states_output


class RewardModel(MegatronModule):
    """GPTModel trunk + a linear scalar head read at each sequence's last real token.

    The head is replicated on every TP rank (its input, the gathered hidden state, is identical there, so its
    gradients are too); it lives on the last pipeline stage.
    """

    def __init__(self, lm):
        super().__init__(config=lm.config)
        self.lm = lm
        self.post_process = lm.post_process
        self.model_type = lm.model_type  # Megatron's schedules look this attribute up on the (unwrapped) model
        self.head = torch.nn.Linear(lm.config.hidden_size, 1, bias=True, dtype=lm.config.params_dtype)
        torch.nn.init.normal_(self.head.weight, std=lm.config.init_method_std)
        torch.nn.init.zeros_(self.head.bias)

    def set_input_tensor(self, input_tensor):
        self.lm.set_input_tensor(input_tensor)

    def forward(self, tokens, position_ids, attention_mask, last_index):
        with hidden_states_output(self.lm):
            hidden = self.lm(tokens, position_ids, attention_mask)
        if not self.post_process:
            return hidden
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.head(hidden[rows, last_index]).squeeze(-1).float()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = self.lm.sharded_state_dict(prefix=f"{prefix}lm.", sharded_offsets=sharded_offsets, metadata=metadata)
        if self.post_process:
            head = self.head.state_dict(prefix="", keep_vars=True)
            sd.update(make_sharded_tensors_for_checkpoint(head, f"{prefix}head.", {}, sharded_offsets))
        return sd


def bradley_terry_loss(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of rows [chosen_0, rejected_0, chosen_1, ...] -> (−log σ(s_c − s_r) mean, pairwise accuracy)."""
    chosen, rejected = scores[0::2], scores[1::2]
    margin = chosen - rejected
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


def encode_pairs(tokenizer, template, prompt_completions: list[tuple[str, str]], seq_length: int):
    """Token rows for (prompt, completion) pairs, right-padded; the index of each row's last real token (EOS)."""
    rows, last = [], []
    for prompt, completion in prompt_completions:
        ids = tokenizer.encode(template.format(prompt)) + tokenizer.encode(completion) + [tokenizer.eos_id]
        ids = ids[-seq_length:]  # keep the end: the completion is what is judged
        rows.append(ids)
        last.append(len(ids) - 1)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    pos = torch.arange(width).unsqueeze(0).expand(len(rows), -1).contiguous()
    return tokens, pos, torch.tensor(last, dtype=torch.long)


def build_reward_model(cfg):
    return RewardModel(build_model(cfg.model, cfg.parallel, cfg.training.precision))
