"""The names an enum-like config field may take, each list written once: the field's type in config.py, its
validation, and the code that implements the choice (ops/loss.py, data/templates.py, ...) all read it here.

Imports nothing of the package, so any layer can use it. Choices a user can extend are registries instead
(advantage estimators and policy losses: ops/registry.py; rewards: rewards/registry.py; presets: presets.py).
"""
from __future__ import annotations

from typing import Literal

Stage = Literal["pretrain", "sft", "grpo", "reward_model"]
Arch = Literal["deepseek_v3", "llama", "qwen2"]
TransformerImpl = Literal["auto", "local", "transformer_engine", "te_standin"]
RopeType = Literal["yarn", "rope"]
RouterScoreFunction = Literal["sigmoid", "softmax"]
TokenDispatcher = Literal["alltoall", "allgather", "flex"]  # Megatron's three
Backend = Literal["auto", "gloo", "nccl"]
Precision = Literal["auto", "fp32", "bf16"]
LRDecayStyle = Literal["constant", "linear", "cosine"]
WandbMode = Literal["offline", "online", "disabled"]
KVCache = Literal["auto", "paged", "contiguous"]
KLEstimator = Literal["k1", "k2", "k3"]  # ops/loss.py numbers them in this order (the CUDA kernel's 1, 2, 3)
LossAgg = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]
AdvantageStd = Literal["sample", "population"]
SingletonAdvantage = Literal["zero", "reward"]
TISLevel = Literal["token", "sequence"]
# data.template also takes any text containing {prompt}
BuiltinTemplate = Literal["r1_zero", "r1_chat", "plain", "chat"]

# What an error calls a value of each choice ("model.arch: unknown architecture 'gpt'").
NOUNS = {
    Stage: "stage", Arch: "architecture", TransformerImpl: "implementation", RopeType: "rope type",
    RouterScoreFunction: "score function", TokenDispatcher: "dispatcher", Backend: "backend",
    Precision: "precision", LRDecayStyle: "style", WandbMode: "mode", KVCache: "cache", KLEstimator: "estimator",
    LossAgg: "aggregation", AdvantageStd: "std", SingletonAdvantage: "value", TISLevel: "level",
    BuiltinTemplate: "template",
}
