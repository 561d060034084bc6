"""Rollout side of GRPO: G sampled answers per prompt from the in-engine generator, then scored by the rewards."""
from __future__ import annotations

import re
from typing import Optional

import torch

from megatron_r1.rl.batch import RolloutBatch


def sample_group_rollouts(engine, tokenizer, template, samples: list[dict], group_size: int, gen_cfg,
                          max_new_tokens: int, seed: int, temperature: Optional[float] = None) -> RolloutBatch:
    """G answers for each sample's templated prompt. Seeds derive from `seed`, so a resumed run samples the same."""
    from megatron_r1.inference import SamplingParams

    prompts, rows, params = [], [], []
    for i, sample in enumerate(samples):
        ids = tokenizer.encode(template.format(sample["prompt"]))
        for j in range(group_size):
            prompts.append(ids)
            rows.append(sample)
            params.append(SamplingParams(
                temperature=gen_cfg.temperature if temperature is None else temperature, top_p=gen_cfg.top_p,
                top_k=gen_cfg.top_k, max_tokens=max_new_tokens, seed=seed * 1_000_003 + i * group_size + j,
                stop_token_ids=[tokenizer.eos_id], stop=list(gen_cfg.stop),
            ))
    results = engine.generate(prompts, params)
    return RolloutBatch(
        prompt_tokens=prompts,
        response_tokens=[list(r.token_ids) for r in results],
        behavior_logprobs=[list(r.logprobs) for r in results],
        texts=[r.text if r.text is not None else tokenizer.decode(r.token_ids) for r in results],
        samples=rows,
        finish_reasons=[r.finish_reason for r in results],
        group_size=group_size,
        # MoE router replay: what the engine's routers chose for each input token (Engine(record_routing=True))
        routing=[r.routing for r in results] if getattr(engine, "record_routing", False) else None,
        routing_layers=tuple(getattr(engine, "routing_layers", ())),
    )


def score_rollouts(batch: RolloutBatch, rewards, overlong_penalty: float = 0.0) -> dict:
    """Fill `batch.rewards` / `batch.components`; returns counters (reward errors, timeouts, truncations)."""
    result = rewards(batch.texts, batch.samples)
    total = torch.tensor(result.total, dtype=torch.float32)
    truncated = torch.tensor([f == "length" for f in batch.finish_reasons], dtype=torch.float32)
    if overlong_penalty:
        total = total - overlong_penalty * truncated  # DAPO-style: answers cut at the limit are discouraged
    batch.rewards = total
    batch.components = {k: list(v) for k, v in result.components.items()}
    return {"reward_errors": result.errors, "reward_timeouts": result.timeouts,
            "truncated_rate": float(truncated.mean()) if len(truncated) else 0.0}


def informative_groups(rewards: torch.Tensor, group_size: int) -> list[int]:
    """Indices of groups whose answers do not all score the same (DAPO dynamic sampling keeps only these)."""
    g = rewards.view(-1, group_size)
    return [i for i in range(g.shape[0]) if float(g[i].max() - g[i].min()) > 1e-8]


REFLECTION_PATTERN_CACHE: dict = {}


def reflection_rate(texts: list[str], words: list[str]) -> float:
    """Share of answers using a reflection phrase ("wait", "let me verify", ...): the aha-moment signal."""
    key = tuple(words)
    pat = REFLECTION_PATTERN_CACHE.get(key)
    if pat is None:
        pat = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        REFLECTION_PATTERN_CACHE[key] = pat
    if not texts:
        return 0.0
    return sum(1 for t in texts if pat.search(t)) / len(texts)
