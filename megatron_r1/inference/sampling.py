"""Per-request sampling parameters and the batched sampler.

Log-probs returned with each sampled token (the behaviour policy for truncated importance sampling):
- `logprobs[t]`: log p(token) under softmax(logits / T), T = the request's temperature (T = 1 for greedy). This is
  what the RL trainer compares against its own recompute at the same temperature.
- `raw_logprobs[t]`: log p(token) under softmax(logits) (temperature 1), for evaluation and KL diagnostics.
Both are normalised over the vocabulary the engine samples from: the real vocabulary when the engine knows it
(`Engine(vocab_size=...)` or its tokenizer; Megatron's padding rows are masked), else the whole padded vocabulary —
the normalisation of `megatron_r1.ops` log-probs over the model's logits (the RL trainer must use the same). top-k /
top-p truncation changes which tokens can be drawn but is not folded into the returned log-probs (RL rollouts use
top_p = 1, top_k = 0, where the two coincide).

Seeds: a request with a seed draws its noise from its own `torch.Generator`, one uniform vector over the vocab per
step (Gumbel/exponential race), so its text does not depend on which other requests share the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_r1.errors import UserError


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops."""

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    max_tokens: int = 64  # new tokens at most (finish_reason "length" when reached)
    seed: Optional[int] = None  # same seed (and prompt and weights) -> same tokens
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); not included in `text`
    stop_token_ids: list[int] = field(default_factory=list)  # generation ends after one of these tokens
    ignore_eos: bool = False  # do not stop at the tokenizer's end-of-sequence token

    def validate(self) -> "SamplingParams":
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UserError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[Optional[torch.Generator]],
           default_gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits [B, V]. Returns (tokens [B], logprobs [B], raw_logprobs [B]).

    Batched except for the per-request noise draw (one small call per seeded row).
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    B, V = logits.shape
    greedy_list = [p.greedy for p in params]
    raw_lp = torch.log_softmax(logits, dim=-1)
    if all(greedy_list):  # the common evaluation case: no temperature, no masks, no noise; lp = raw_lp
        # log_softmax subtracts one value per row and rounding is monotonic, so its row maximum is exactly its
        # value at the argmax token (a reduction instead of a gather)
        lp = raw_lp.amax(-1)
        return logits.argmax(-1), lp, lp
    temp_list = [p.temperature if p.temperature > 0 else 1.0 for p in params]
    if any(t != 1.0 for t in temp_list):
        lp = torch.log_softmax(logits / torch.tensor(temp_list, device=logits.device)[:, None], dim=-1)
    else:
        lp = raw_lp
    greedy = torch.tensor(greedy_list, device=logits.device)
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    if any(greedy_list):
        tokens[greedy] = logits[greedy].argmax(-1)
    idx = (~greedy).nonzero().squeeze(-1)
    rows_lp = lp[idx]
    ks = [params[i].top_k for i in idx.tolist()]
    ps = [params[i].top_p for i in idx.tolist()]
    if any(k > 0 for k in ks) or any(p < 1.0 for p in ps):
        rows_lp = _truncate(rows_lp, ks, ps)
    # exponential race: argmax p / E with E ~ Exp(1) is a draw from p; noise from the request's generator
    # drawn on the CPU (per-request CPU generators: the same seed gives the same text on any device)
    noise = torch.empty(rows_lp.shape, dtype=torch.float32)
    for j, i in enumerate(idx.tolist()):
        gen = generators[i] if generators[i] is not None else default_gen
        noise[j].uniform_(generator=gen)
    noise = noise.to(rows_lp.device)
    gumbel_like = rows_lp - torch.log(-torch.log(noise.clamp_min(1e-20)))
    tokens[idx] = gumbel_like.argmax(-1)
    ar = torch.arange(B, device=logits.device)
    return tokens, lp[ar, tokens], raw_lp[ar, tokens]


def _truncate(lp: torch.Tensor, ks: list[int], ps: list[float]) -> torch.Tensor:
    """Set log-probs outside each row's top-k / nucleus to -inf."""
    sorted_lp, order = lp.sort(dim=-1, descending=True)
    V = lp.shape[-1]
    rank = torch.arange(V, device=lp.device)[None, :]
    k = torch.tensor([kk if kk > 0 else V for kk in ks], device=lp.device)[:, None]
    drop = rank >= k
    p = torch.tensor(ps, device=lp.device)[:, None]
    cum = sorted_lp.exp().cumsum(-1)
    # keep a token while the mass before it is < top_p (the most likely token is always kept)
    drop |= (cum - sorted_lp.exp()) >= p
    sorted_lp = sorted_lp.masked_fill(drop, float("-inf"))
    return torch.empty_like(lp).scatter_(1, order, sorted_lp)
