"""Typed configuration for every stage: dataclasses loaded from YAML, overridden by `section.key=value`.

One source of truth: each field is documented once, here, at its definition. Defaults follow the DeepSeek-R1 /
R1-Zero reports where they say something. `load_config(path, overrides)` returns a validated `Config`; any error
names the field (and the file) and says why.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from megatron_r1.choices import (
    NOUNS,
    AdvantageStd,
    Arch,
    Backend,
    BuiltinTemplate,
    KLEstimator,
    KVCache,
    LossAgg,
    LRDecayStyle,
    Precision,
    RopeType,
    RouterScoreFunction,
    SingletonAdvantage,
    Stage,
    TISLevel,
    TokenDispatcher,
    TransformerImpl,
    WandbMode,
)
from megatron_r1.data.tokenizer import resolve_tokenizer
from megatron_r1.errors import ConfigError
from megatron_r1.presets import preset_fields


# ----------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    """Architecture. `preset` fills every field first; fields given next to it override the preset's values."""

    preset: Optional[str] = None  # a name in presets.py (deepseek_v3, deepseek_v3_tiny, llama_tiny, ...)
    arch: Arch = "deepseek_v3"  # deepseek_v3 (MLA + MoE) | llama | qwen2 (dense, GQA)
    num_layers: int = 4  # decoder layers
    hidden_size: int = 128  # model width
    ffn_hidden_size: int = 384  # dense MLP width (DeepSeek-V3: the first-k dense layers)
    num_attention_heads: int = 4  # query heads
    num_query_groups: Optional[int] = None  # GQA groups for dense models; None = multi-head
    kv_channels: Optional[int] = None  # head dim of dense models; None = hidden / heads
    vocab_size: int = 512  # tokenizer vocab; padded by the model builder (see vocab_pad_multiple)
    # Embedding/output rows are padded to a multiple of this, independent of the TP size (any power of two up to
    # it divides the result), so a checkpoint saved at one TP size loads at another; Megatron's own rule (a
    # multiple of 128 × TP) would change the shapes with TP.
    vocab_pad_multiple: int = 128
    max_position_embeddings: int = 512  # longest position the rotary tables cover
    seq_length: int = 256  # training sequence length (prompt + response in RL)
    norm_epsilon: float = 1e-6  # RMSNorm epsilon
    rotary_base: float = 10000.0  # RoPE theta
    untie_embeddings_and_output_weights: bool = True  # DeepSeek-V3: untied; small Llamas: tied
    add_qkv_bias: bool = False  # Qwen2: True
    init_method_std: float = 0.02  # std of the normal weight init
    # Multi-latent attention (DeepSeek-V2/V3).
    multi_latent_attention: bool = True
    q_lora_rank: Optional[int] = 48  # None: queries are not compressed
    kv_lora_rank: int = 32  # the compressed KV width (what the KV cache stores)
    qk_head_dim: int = 32  # the no-position ("nope") part of each query/key head
    qk_pos_emb_head_dim: int = 16  # the rotary part, shared by all heads for keys
    v_head_dim: int = 32  # value head dim
    rope_type: RopeType = "yarn"  # yarn (YaRN-extended, DeepSeek-V3) | rope (plain RoPE)
    # YaRN (rope_type=yarn): context extension factor over the original window, its frequency ramp
    # (beta_fast/beta_slow) and attention-temperature terms (mscale, mscale_all_dim), as in DeepSeek-V3's config
    rotary_scaling_factor: float = 40.0  # YaRN: the context-extension factor
    original_max_position_embeddings: int = 4096  # YaRN: the window before extension
    beta_fast: float = 32.0  # YaRN: ramp end (rotations)
    beta_slow: float = 1.0  # YaRN: ramp start (rotations)
    mscale: float = 1.0  # YaRN: attention temperature term
    mscale_all_dim: float = 1.0  # YaRN: attention temperature term over all dims
    # DeepSeekMoE.
    num_experts: Optional[int] = 4  # routed experts; None = dense model
    moe_ffn_hidden_size: int = 96  # width of each routed expert
    moe_shared_expert_intermediate_size: Optional[int] = 96  # one shared expert of this width; None = none
    moe_router_topk: int = 2  # experts per token
    moe_router_num_groups: Optional[int] = 2  # group-limited routing: experts split in groups ...
    moe_router_group_topk: Optional[int] = 1  # ... and only the best groups are eligible
    moe_router_score_function: RouterScoreFunction = "sigmoid"  # DeepSeek-V3: sigmoid; V2/Mixtral: softmax
    moe_router_enable_expert_bias: bool = True  # aux-loss-free balancing with a per-expert bias
    moe_router_bias_update_rate: float = 1e-3  # step of the expert-bias update per training step
    moe_router_topk_scaling_factor: Optional[float] = 2.5  # routed scaling factor
    moe_aux_loss_coeff: float = 0.0  # DeepSeek-V3 relies on the bias, not an aux loss (a tiny seq-aux loss is optional)
    first_k_dense_replace: int = 1  # the first k layers use a dense MLP
    moe_token_dispatcher_type: TokenDispatcher = "alltoall"  # alltoall | allgather | flex (Megatron's dispatchers)
    mtp_num_layers: Optional[int] = None  # multi-token prediction depth (DeepSeek-V3: 1)
    mtp_loss_scaling_factor: float = 0.1  # weight of the MTP loss
    # Layer modules: auto (Transformer Engine when it imports and a GPU is present, else local) | local (torch
    # modules) | transformer_engine (an error if TE is missing) | te_standin (TE's parameter layout — norms fused
    # into the next linear as `layer_norm_weight` — from torch modules; runs on CPU, tests the TE layout)
    transformer_impl: TransformerImpl = "auto"

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Rows of the embedding and output layer: vocab_size rounded up to vocab_pad_multiple (and to a multiple
        of TP when that one is not); the same at every TP size that divides the multiple."""
        return padded_vocab_size(self.vocab_size, tp, self.vocab_pad_multiple)


def get_preset(name: str, where: str = "model.preset") -> ModelConfig:
    """A fresh ModelConfig for preset `name` (megatron_r1/presets.py), with its `preset` field set."""
    return ModelConfig(**preset_fields(name, where), preset=name)


def padded_vocab_size(vocab_size: int, tp: int = 1, multiple: int = 128) -> int:
    """See ModelConfig.padded_vocab_size (a plain function for callers that only have the numbers)."""
    step = multiple if multiple % tp == 0 else math.lcm(multiple, tp)
    return ((vocab_size + step - 1) // step) * step


@dataclass
class ParallelConfig:
    """Layout. world size = TP × PP × DP; experts are split EP-way inside DP × TP (Megatron's expert groups)."""

    tensor_model_parallel_size: int = 1  # TP
    pipeline_model_parallel_size: int = 1  # PP
    expert_model_parallel_size: int = 1  # EP
    expert_tensor_parallel_size: Optional[int] = 1  # TP inside experts; DeepSeek-V3 uses 1
    sequence_parallel: Optional[bool] = None  # None: on when TP > 1 (required for MoE with TP)
    use_distributed_optimizer: bool = False  # ZeRO-1 over DP; see README for what CPU supports
    backend: Backend = "auto"  # auto (nccl on GPU, gloo on CPU) | gloo | nccl
    num_microbatches: Optional[int] = None  # None: global batch / (micro batch × DP)
    # Uneven pipelines (DeepSeek-V3's 61 layers over 16 stages): layers on the first / last stage; the rest are
    # split evenly over the middle stages. None: all stages equal.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None  # (see the line above)

    def pipeline_stage_layers(self, num_layers: int) -> list[int]:
        """How many decoder layers each pipeline stage holds (what Megatron builds for this config)."""
        pp = self.pipeline_model_parallel_size
        first, last = self.num_layers_in_first_pipeline_stage, self.num_layers_in_last_pipeline_stage
        if pp == 1:
            return [num_layers]
        if first is None and last is None:
            return [num_layers // pp] * pp
        middle_stages = pp - (first is not None) - (last is not None)
        rest = num_layers - (first or 0) - (last or 0)
        per = rest // middle_stages if middle_stages else 0
        counts = [per] * pp
        if first is not None:
            counts[0] = first
        if last is not None:
            counts[-1] = last
        return counts


@dataclass
class OptimizerConfig:
    """Adam(W) with a warmup-then-decay learning rate (Megatron's optimizer and scheduler)."""

    lr: float = 1e-3  # peak learning rate, reached after the warmup
    min_lr: float = 1e-4  # the decay ends here
    lr_warmup_steps: int = 10  # linear warmup from 0
    lr_decay_style: LRDecayStyle = "cosine"  # constant | linear | cosine (to min_lr at the last step)
    weight_decay: float = 0.01  # decoupled (AdamW)
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.95  # Adam's second-moment decay
    adam_eps: float = 1e-8  # Adam's denominator epsilon
    clip_grad: float = 1.0  # global gradient-norm clip; 0 = none


@dataclass
class TrainingConfig:
    train_steps: int = 100  # optimizer steps (RL: GRPO steps)
    micro_batch_size: int = 4  # rows per forward/backward on one rank
    global_batch_size: int = 16  # rows per optimizer step over all DP ranks (pretrain/SFT/reward model)
    precision: Precision = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    seed: int = 1234  # model init, data order and sampling
    eval_interval: int = 0  # steps between evaluations; 0 = never
    eval_batches: int = 4  # batches per evaluation
    recompute_activations: bool = False  # full activation recompute (memory for compute)
    num_epochs: Optional[int] = None  # SFT: epochs over the dataset (overrides train_steps when set)
    # GRPO: pack answers into micro-batches by padded tokens (rows × longest row <= this) instead of
    # micro_batch_size rows each (verl/slime "dynamic batch size"); the gradient is the same. None: fixed rows
    max_tokens_per_micro_batch: Optional[int] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None  # directory of checkpoints (iter_0000010/ ... and `latest`)
    load: Optional[str] = None  # resume from / initialise with this directory (None: `save` when it has one)
    save_interval: int = 0  # 0 = only at the end
    keep_last: int = 2  # older checkpoints are removed after a new one is committed
    load_optimizer: bool = True  # False: weights only (start a new stage from a checkpoint)
    finetune: bool = False  # True: load weights, reset step, data position and optimizer


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"  # tensorboard events, plots, results
    tensorboard: bool = True  # tensorboard events under run_dir/tensorboard
    progress: bool = True  # progress bar on rank 0
    plots: bool = True  # PNG curves at the end of a run
    wandb: bool = False  # also log the scalars and the run config to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "megatron-r1"  # the W&B project runs are logged under
    wandb_mode: WandbMode = "offline"  # offline (no network; `wandb sync` later) | online | disabled


@dataclass
class TokenizerConfig:
    # builtin:demo | a local directory with tokenizer.json | a tokenizer.json file. Unset (null): the tokenizer the
    # checkpoint this run starts from carries (resumed checkpoint.save, else checkpoint.load), else builtin:demo.
    path: Optional[str] = None


@dataclass
class DataConfig:
    source: str = "builtin:demo_arithmetic"  # path (.jsonl/.parquet/HF dir) or builtin:<task>
    eval_source: Optional[str] = None  # held-out set; None = the same source with split=test
    # r1_zero | r1_chat | plain | chat (the tokenizer's chat template): choices.BuiltinTemplate; or text with {prompt}
    template: str = "r1_zero"
    field_map: dict = field(default_factory=dict)  # dataset column -> our field (prompt, answer, ...)
    options: dict = field(default_factory=dict)  # passed to the builtin generator (num_samples, seed, ...)
    skip_bad_rows: bool = False  # drop (and count) rows missing a field instead of failing


@dataclass
class RewardConfig:
    """One term of the reward: sum over the list of weight × reward."""

    name: str = "accuracy"  # a registered reward (rewards/registry.py) or `pkg.module:function`
    weight: float = 1.0  # this term's factor in the sum
    options: dict = field(default_factory=dict)  # keyword arguments of the reward (checked against its signature)


@dataclass
class GenerationConfig:
    """Sampling for rollouts and evaluation (the in-engine generation server)."""

    temperature: float = 1.0  # R1-Zero samples at 1.0
    top_p: float = 1.0  # nucleus sampling; 1.0 = off
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64  # evaluation and sampling jobs (RL answers: rl.max_response_length)
    max_batch_size: int = 64  # requests decoded together
    stop: list[str] = field(default_factory=list)  # strings that end an answer (besides end-of-sequence)
    cuda_graphs: bool = True  # on a GPU, replay decode steps as CUDA graphs (one per batch/length bucket); eager on CPU
    # KV cache (inference/paged_cache.py): auto (paged, except contiguous rows where the fused CPU decode step
    # applies: a dense fp32 model on the CPU) | paged | contiguous (rows that grow with the running requests, in
    # power-of-two position buckets, up to max_batch_size x context; freed when the engine is idle)
    kv_cache: KVCache = "auto"
    kv_block_size: int = 16  # tokens per paged-cache block
    kv_cache_blocks: Optional[int] = None  # paged pool size in blocks; null: from kv_cache_memory_gb
    # GiB per rank the KV cache may use (also what `megatron-r1 plan` counts). Paged: the pool's size (null, with
    # kv_cache_blocks null: max_batch_size x context tokens, preallocated). Contiguous: the most it may grow to
    # (null: what the running requests need). Either way a full cache preempts the newest requests (recompute)
    # instead of running out of memory
    kv_cache_memory_gb: Optional[float] = None


@dataclass
class RLConfig:
    """GRPO (R1-Zero defaults: KL 0.001 with k3, temperature 1.0, clip 0.2)."""

    prompts_per_step: int = 32  # B
    group_size: int = 16  # G answers per prompt
    max_prompt_length: int = 128  # longer prompts are dropped
    max_response_length: int = 64  # generation limit of each answer
    ppo_epochs: int = 1  # μ
    mini_batch_size: int = 64  # answers per optimizer step inside an RL step
    clip_low: float = 0.2  # ratio clip [1 − clip_low, 1 + clip_high]
    clip_high: float = 0.2  # DAPO clip-higher: 0.28
    kl_coef: float = 0.001  # weight of the KL penalty to the reference model; 0 = no reference model
    kl_estimator: KLEstimator = "k3"  # k1 (log-ratio) | k2 (half squared) | k3 (unbiased, non-negative; R1)
    # seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO: ÷ answers ×
    # max_response_length, a constant). The choices below are explained, with verl's and TRL's, in
    # docs/rl_conventions.md
    loss_agg: LossAgg = "seq-mean-token-mean"
    advantage_estimator: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_plus_plus | reinforce_plus_plus_baseline
    policy_loss: str = "clip"  # clip (PPO/GRPO) | dual_clip | cispo | gspo (sequence ratio)
    advantage_std: AdvantageStd = "sample"  # sample (÷(N−1), verl and TRL) | population (÷N)
    advantage_eps: float = 1e-6  # added to the std (verl 1e-6, TRL 1e-4)
    singleton_advantage: SingletonAdvantage = "zero"  # a group of one answer: zero (TRL) | reward (verl: mean 0, std 1)
    kl_clamp: Optional[float] = None  # clamp each token's KL estimate to [−kl_clamp, kl_clamp] (verl: 10)
    clip_ratio_c: float = 3.0  # dual_clip: a negative-advantage token's loss is capped at −c·A (verl: 3)
    tis_on_kl: bool = False  # the TIS weight multiplies the KL term too (verl and TRL: policy-gradient term only)
    tis_level: TISLevel = "token"  # token: a TIS weight per token | sequence: one per answer (geometric mean)
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, refill
    max_refill_rounds: int = 3  # dynamic_sampling: extra generation rounds before training on fewer groups
    overlong_penalty: float = 0.0  # subtracted from answers that hit max_response_length
    tis_cap: Optional[float] = None  # truncated importance sampling cap (behaviour vs trainer)
    reference_offload: bool = False  # keep the frozen reference model's weights on the CPU
    shared_prefix: bool = False  # forward each group as one row [prompt, answer_1..G]: the prompt once, not G times
    # MoE models only: the trainer's old-log-prob and gradient passes route every token to the experts the engine
    # chose for it in the rollout (models/router_replay.py), so routing cannot differ between rollout and update.
    # MoE runs always record the routing and log rl/routing_mismatch (the share of (token, layer) pairs the
    # trainer routes differently) whether or not it is replayed. With shared_prefix the group's prompt replays
    # its first answer's record
    router_replay: bool = False
    # counted in answers for the rl/reflection_words metric (R1-Zero's "aha moment")
    reflection_words: list[str] = field(
        default_factory=lambda: ["wait", "re-check", "recheck", "let me verify", "verify", "double-check", "hmm"]
    )


@dataclass
class Config:
    """Everything one run needs. `stage` picks the job run by `megatron-r1 train`."""

    stage: Stage = "pretrain"  # pretrain | sft | grpo | reward_model
    model: ModelConfig = field(default_factory=ModelConfig)  # (each section: see its class above)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # layout
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  # optimizer and learning rate
    training: TrainingConfig = field(default_factory=TrainingConfig)  # steps, batches, precision
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # saving and loading
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # where scalars and plots go
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)  # which tokenizer
    data: DataConfig = field(default_factory=DataConfig)  # dataset, template, field names
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # sampling and the KV cache
    rl: RLConfig = field(default_factory=RLConfig)  # GRPO
    # the reward: weight × reward summed over these (grpo; the pipeline's mixtures route them by prompt kind)
    rewards: list[RewardConfig] = field(
        default_factory=lambda: [RewardConfig("accuracy", 1.0), RewardConfig("format", 1.0)])


STAGES = typing.get_args(Stage)
# Fields that were replaced: loading an old config names the replacement instead of saying "unknown field".
REMOVED_FIELDS = {
    ("RLConfig", "ratio_level"): "use rl.policy_loss (token ratio: clip; sequence ratio: gspo)",
    ("RLConfig", "advantage_scale"): "use rl.advantage_estimator (std: grpo; none: dr_grpo)",
}


# ----------------------------------------------------------------------------------------------- loading
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads "3e-3" as a string; people write learning rates that way.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        elem = (typing.get_args(tp) or (Any,))[0]
        if dataclasses.is_dataclass(elem):
            return [_from_dict(elem, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return list(value)
    if origin is Literal:
        # a string here; whether it is one of the choices is checked by validate() (configs built in code too)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected one of {', '.join(typing.get_args(tp))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    return value


def _from_dict(cls, data: Any, where: str, base=None):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are errors naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    obj = base if base is not None else cls()
    if cls is ModelConfig and data.get("preset") is not None and base is None:
        obj = get_preset(data["preset"], where=f"{where}.preset" if where else "preset")
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names and (cls.__name__, key) in REMOVED_FIELDS:
            raise ConfigError(f"{path}: removed; {REMOVED_FIELDS[(cls.__name__, key)]}")
        if key not in names:
            close = [n for n in names if n.startswith(key[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise ConfigError(f"{path}: unknown field{hint}")
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            coerced = _from_dict(hints[key], value, path, base=None if key == "model" else getattr(obj, key))
        else:
            coerced = _coerce(value, hints[key], path)
        setattr(obj, key, coerced)
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.hidden_size=256` -> (["model", "hidden_size"], 256); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.__class__.__name__})") from None
    return key.split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    node = data
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(keys)}: {k} is not a section")
        node = nxt
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; syntax errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise ConfigError(f"{loc}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def config_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> Config:
    data = _deepcopy_plain(data)
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    # A preset given only by override must still be applied before the model's other fields.
    try:
        cfg = _from_dict(Config, data, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None

    resolve_tokenizer(cfg, source)
    validate(cfg, source=source)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load YAML (or start from defaults when `path` is None), apply `key=value` overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(data, overrides, source=str(path) if path is not None else "config")


def _deepcopy_plain(data):
    if isinstance(data, dict):
        return {k: _deepcopy_plain(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy_plain(v) for v in data]
    return data


def to_dict(cfg) -> dict:
    """The config as plain data (for logging at start and saving beside checkpoints)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ----------------------------------------------------------------------------------------------- validation
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config, world_size: Optional[int] = None, source: str = "config") -> None:
    """Consistency checks that a run would otherwise trip over deep inside Megatron. Messages name the field."""
    try:
        _validate(cfg, world_size)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _validate(cfg: Config, world_size: Optional[int]) -> None:
    m, p, t = cfg.model, cfg.parallel, cfg.training
    _validate_choices(cfg, "")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
        _check(getattr(m, name) > 0, f"model.{name}: must be positive, got {getattr(m, name)}")
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    for name, v in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                    ("expert_model_parallel_size", ep)):
        _check(v >= 1, f"parallel.{name}: must be >= 1, got {v}")
    _check(m.num_attention_heads % tp == 0,
           f"parallel.tensor_model_parallel_size: {tp} does not divide model.num_attention_heads "
           f"({m.num_attention_heads})")
    if m.num_query_groups is not None:
        _check(m.num_attention_heads % m.num_query_groups == 0,
               f"model.num_query_groups: {m.num_query_groups} does not divide num_attention_heads "
               f"({m.num_attention_heads})")
        _check(m.num_query_groups % tp == 0,
               f"parallel.tensor_model_parallel_size: {tp} does not divide model.num_query_groups "
               f"({m.num_query_groups})")
    _validate_pipeline_split(m, p)
    if m.kv_channels is None and not m.multi_latent_attention:
        _check(m.hidden_size % m.num_attention_heads == 0,
               f"model.hidden_size: {m.hidden_size} is not divisible by num_attention_heads "
               f"({m.num_attention_heads}); set model.kv_channels")
    if m.multi_latent_attention:
        _check(m.arch == "deepseek_v3", "model.multi_latent_attention: only the deepseek_v3 architecture uses MLA")
        _check(tp == 1 or p.sequence_parallel is not False,
               "parallel.sequence_parallel: MLA with tensor parallelism needs sequence parallelism (its replicated "
               "down projections rely on it for correct gradients)")
    if m.num_experts:
        _check(m.arch == "deepseek_v3", "model.num_experts: only the deepseek_v3 architecture has MoE layers")
        _check(m.num_experts % ep == 0,
               f"parallel.expert_model_parallel_size: {ep} does not divide model.num_experts ({m.num_experts})")
        _check(1 <= m.moe_router_topk <= m.num_experts,
               f"model.moe_router_topk: {m.moe_router_topk} must be in [1, num_experts={m.num_experts}]")
        if m.moe_router_num_groups:
            _check(m.num_experts % m.moe_router_num_groups == 0,
                   f"model.moe_router_num_groups: {m.moe_router_num_groups} does not divide num_experts "
                   f"({m.num_experts})")
            _check(m.moe_router_group_topk is not None and 1 <= m.moe_router_group_topk <= m.moe_router_num_groups,
                   f"model.moe_router_group_topk: must be in [1, moe_router_num_groups={m.moe_router_num_groups}]")
        _check(0 <= m.first_k_dense_replace <= m.num_layers,
               f"model.first_k_dense_replace: {m.first_k_dense_replace} must be in [0, num_layers={m.num_layers}]")
    else:
        _check(ep == 1, "parallel.expert_model_parallel_size: must be 1 for a dense model (model.num_experts unset)")
    _check(t.micro_batch_size >= 1, f"training.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    _check(t.global_batch_size % t.micro_batch_size == 0,
           f"training.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size "
           f"({t.micro_batch_size})")
    o = cfg.optimizer
    _check(o.lr > 0, f"optimizer.lr: must be positive, got {o.lr}")
    r = cfg.rl
    from megatron_r1.ops.registry import advantage_estimators, policy_losses

    _check(r.group_size >= 1, f"rl.group_size: must be >= 1, got {r.group_size}")
    _check(r.advantage_estimator in advantage_estimators(),
           f"rl.advantage_estimator: unknown estimator {r.advantage_estimator!r} "
           f"(choose from {', '.join(advantage_estimators())})")
    _check(r.policy_loss in policy_losses(),
           f"rl.policy_loss: unknown loss {r.policy_loss!r} (choose from {', '.join(policy_losses())})")
    _check(r.group_size >= 2 or r.singleton_advantage == "reward" or r.advantage_estimator == "reinforce_plus_plus",
           f"rl.group_size: {r.advantage_estimator} compares answers within a group, and with one answer per group "
           f"every advantage is 0 (rl.singleton_advantage=zero); use G >= 2, rl.singleton_advantage=reward or "
           f"rl.advantage_estimator=reinforce_plus_plus")
    _check(r.advantage_eps >= 0, f"rl.advantage_eps: must be >= 0, got {r.advantage_eps}")
    _check(r.kl_clamp is None or r.kl_clamp > 0, f"rl.kl_clamp: must be positive or null, got {r.kl_clamp}")
    _check(r.clip_ratio_c > 1, f"rl.clip_ratio_c: must be > 1, got {r.clip_ratio_c}")
    _check(t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
           f"training.max_tokens_per_micro_batch: must be >= 1 or null, got {t.max_tokens_per_micro_batch}")
    _check(0 <= r.clip_low <= 1 and r.clip_high >= 0, "rl.clip_low/clip_high: need 0 <= clip_low <= 1, clip_high >= 0")
    _check((r.prompts_per_step * r.group_size) % r.mini_batch_size == 0,
           f"rl.mini_batch_size: {r.mini_batch_size} does not divide prompts_per_step × group_size "
           f"({r.prompts_per_step * r.group_size})")
    if r.shared_prefix:
        for name, v in (("rl.mini_batch_size", r.mini_batch_size), ("training.micro_batch_size", t.micro_batch_size)):
            _check(v % r.group_size == 0,
                   f"{name}: {v} is not a multiple of rl.group_size ({r.group_size}); rl.shared_prefix packs each "
                   f"group into one row, so batches must hold whole groups")
        _check(not (t.recompute_activations and m.multi_latent_attention),
               "rl.shared_prefix: not supported with training.recompute_activations for MLA models (MLA computes "
               "its rotary embedding inside the recomputed layers, outside the position-id bridge)")
    _check(not r.router_replay or bool(m.num_experts),
           "rl.router_replay: only meaningful for MoE models (model.num_experts is unset: a dense model has no "
           "routing to replay)")
    gen = cfg.generation
    _check(gen.kv_block_size >= 1, f"generation.kv_block_size: must be >= 1, got {gen.kv_block_size}")
    _check(gen.kv_cache_blocks is None or gen.kv_cache_blocks >= 2,
           f"generation.kv_cache_blocks: must be >= 2 or null, got {gen.kv_cache_blocks}")
    _check(gen.kv_cache_memory_gb is None or gen.kv_cache_memory_gb > 0,
           f"generation.kv_cache_memory_gb: must be positive or null, got {gen.kv_cache_memory_gb}")
    templates = typing.get_args(BuiltinTemplate)
    _check(cfg.data.template in templates or "{prompt}" in cfg.data.template,
           f"data.template: unknown template {cfg.data.template!r} ({', '.join(templates)}, or text "
           f"containing {{prompt}})")
    if world_size is not None:
        validate_world_size(cfg.parallel, world_size)


def _validate_choices(section: Any, where: str) -> None:
    """Every field typed with a choice (choices.py) holds one of its names; sections are walked recursively."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp, path = getattr(section, f.name), hints[f.name], f"{where}{f.name}"
        if dataclasses.is_dataclass(tp):
            _validate_choices(value, f"{path}.")
        elif typing.get_origin(tp) is Literal:
            names = typing.get_args(tp)
            _check(value in names, f"{path}: unknown {NOUNS.get(tp, 'value')} {value!r} (choose from "
                                   f"{', '.join(names)})")


def _validate_pipeline_split(m: ModelConfig, p: ParallelConfig) -> None:
    pp = p.pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        _check(m.num_layers % pp == 0,
               f"parallel.pipeline_model_parallel_size: {pp} does not divide model.num_layers ({m.num_layers}); "
               f"for an uneven split set parallel.num_layers_in_first_pipeline_stage / _last_")
        return
    _check(pp > 1, "parallel.num_layers_in_first/last_pipeline_stage: need pipeline_model_parallel_size > 1")
    for name, v in (("num_layers_in_first_pipeline_stage", first), ("num_layers_in_last_pipeline_stage", last)):
        _check(v is None or v >= 0, f"parallel.{name}: must be >= 0, got {v}")
    middle_stages = pp - (first is not None) - (last is not None)
    rest = m.num_layers - (first or 0) - (last or 0)
    _check(rest >= 0, f"parallel: first + last pipeline stage layers exceed model.num_layers ({m.num_layers})")
    if middle_stages:
        _check(rest % middle_stages == 0,
               f"parallel.pipeline_model_parallel_size: the {rest} layers left for the {middle_stages} middle "
               f"stages do not split evenly (model.num_layers={m.num_layers}, first={first}, last={last})")
    else:
        _check(rest == 0, f"parallel: first + last pipeline stage layers must equal model.num_layers ({m.num_layers})")


def validate_world_size(p: ParallelConfig, world_size: int) -> None:
    tp, pp, ep = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size
    _check(world_size % (tp * pp) == 0,
           f"parallel: world size {world_size} is not divisible by tensor × pipeline parallel size ({tp}×{pp})")
    dp = world_size // (tp * pp)
    etp = p.expert_tensor_parallel_size or tp
    _check((dp * tp) % (ep * etp) == 0,
           f"parallel.expert_model_parallel_size: {ep} (× expert TP {etp}) does not divide data × tensor parallel "
           f"ranks ({dp}×{tp}) at world size {world_size}")
