"""Rewards of the R1 recipe: rule rewards (accuracy, format, language consistency), sandboxed code, combination.

`get_reward(name, **options)` returns a batched `fn(completions, samples) -> list[float]`; `CombinedReward` sums
weighted components from the config and reports each one for logging.
"""
from megatron_r1.rewards.combine import CombinedReward, RewardResult, RewardSpec
from megatron_r1.rewards.extract import extract_answer, extract_think, last_boxed, last_code_block
from megatron_r1.rewards.registry import available_rewards, get_reward, register_reward

__all__ = [
    "CombinedReward", "RewardResult", "RewardSpec", "available_rewards", "extract_answer", "extract_think",
    "get_reward", "last_boxed", "last_code_block", "register_reward",
]
