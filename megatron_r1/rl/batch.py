"""The typed seams of the RL loop: a batch of rollouts, and its padded tensor form for the trainer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RolloutBatch:
    """G answers for each of B prompts (each group contiguous), with what the rollout side knows about them."""

    prompt_tokens: list  # [N] lists of token ids (the templated prompt), repeated for each answer of a group
    response_tokens: list  # [N] lists of sampled token ids (stop token included when one was sampled)
    behavior_logprobs: list  # [N] lists: the engine's log-prob of each sampled token (behaviour policy)
    texts: list  # [N] decoded responses
    samples: list  # [N] dataset rows (prompt, answer, ...) for the rewards
    finish_reasons: list  # [N] "stop" | "length"
    group_size: int
    rewards: Optional[torch.Tensor] = None  # [N] weighted total
    components: dict = field(default_factory=dict)  # reward name -> [N] values
    advantages: Optional[torch.Tensor] = None  # [N]

    def __len__(self) -> int:
        return len(self.response_tokens)

    def select(self, idx: list) -> "RolloutBatch":
        """The answers at `idx` (whole groups, for dynamic sampling)."""
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return RolloutBatch(
            prompt_tokens=pick(self.prompt_tokens), response_tokens=pick(self.response_tokens),
            behavior_logprobs=pick(self.behavior_logprobs), texts=pick(self.texts), samples=pick(self.samples),
            finish_reasons=pick(self.finish_reasons), group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[idx],
            components={k: [v[i] for i in idx] for k, v in self.components.items()},
            advantages=None if self.advantages is None else self.advantages[idx],
        )

    @staticmethod
    def concat(parts: list) -> "RolloutBatch":
        first = parts[0]
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return RolloutBatch(
            prompt_tokens=cat("prompt_tokens"), response_tokens=cat("response_tokens"),
            behavior_logprobs=cat("behavior_logprobs"), texts=cat("texts"), samples=cat("samples"),
            finish_reasons=cat("finish_reasons"), group_size=first.group_size,
            rewards=None if first.rewards is None else torch.cat([p.rewards for p in parts]),
            components={k: [x for p in parts for x in p.components[k]] for k in first.components},
            advantages=None if first.advantages is None else torch.cat([p.advantages for p in parts]),
        )


@dataclass
class PolicyBatch:
    """Padded tensors for the trainer. Sequences are prompt + response, right-padded; response-aligned tensors
    [N, R] index the response tokens only (R = longest response), so losses see answers, never prompts."""

    tokens: torch.Tensor  # [N, S] model input (sequence without its last token)
    labels: torch.Tensor  # [N, S] next tokens
    position_ids: torch.Tensor  # [N, S]
    response_index: torch.Tensor  # [N, R] column in `labels` of each response token
    response_mask: torch.Tensor  # [N, R] 1.0 for real response tokens
    advantages: torch.Tensor  # [N]
    behavior_logprobs: torch.Tensor  # [N, R]
    old_logprobs: Optional[torch.Tensor] = None  # [N, R] filled by the trainer's recompute
    ref_logprobs: Optional[torch.Tensor] = None  # [N, R] from the frozen reference model

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def slice(self, start: int, end: int) -> "PolicyBatch":
        s = lambda t: None if t is None else t[start:end]  # noqa: E731
        return PolicyBatch(s(self.tokens), s(self.labels), s(self.position_ids), s(self.response_index),
                           s(self.response_mask), s(self.advantages), s(self.behavior_logprobs),
                           s(self.old_logprobs), s(self.ref_logprobs))

    def to(self, device) -> "PolicyBatch":
        m = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PolicyBatch(m(self.tokens), m(self.labels), m(self.position_ids), m(self.response_index),
                           m(self.response_mask), m(self.advantages), m(self.behavior_logprobs),
                           m(self.old_logprobs), m(self.ref_logprobs))


def collate(rollouts: RolloutBatch, pad_id: int, max_response: Optional[int] = None) -> PolicyBatch:
    """Pad prompt+response sequences; build the response index/mask used to gather per-token log-probs."""
    n = len(rollouts)
    seqs = [list(p) + list(r) for p, r in zip(rollouts.prompt_tokens, rollouts.response_tokens)]
    s_len = max(len(x) for x in seqs)
    r_len = max(1, max(len(r) for r in rollouts.response_tokens))
    if max_response is not None:
        r_len = max(r_len, max_response)
    full = torch.full((n, s_len), pad_id, dtype=torch.long)
    index = torch.zeros((n, r_len), dtype=torch.long)
    mask = torch.zeros((n, r_len), dtype=torch.float32)
    behav = torch.zeros((n, r_len), dtype=torch.float32)
    for i, (p, r, lp) in enumerate(zip(rollouts.prompt_tokens, rollouts.response_tokens,
                                       rollouts.behavior_logprobs)):
        full[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        k = len(r)
        # Label column j holds token j+1: response token t (at sequence index len(p)+t) is label column len(p)+t-1.
        index[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
        mask[i, :k] = 1.0
        if lp:
            behav[i, :k] = torch.tensor(lp[:k], dtype=torch.float32)
    tokens, labels = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    pos = torch.arange(s_len - 1).unsqueeze(0).expand(n, -1).contiguous()
    adv = rollouts.advantages if rollouts.advantages is not None else torch.zeros(n)
    return PolicyBatch(tokens, labels, pos, index, mask, adv.float(), behav)
