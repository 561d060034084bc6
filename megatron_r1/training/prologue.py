"""What every training stage does before it builds its model, in one place: the process groups, the tokenizer
(checked against the model's vocabulary), the prompt template and the stage's samples.

Pre-training, SFT, the reward-model trainer and GRPO all start this way, and so do the sampler of rejection
sampling and `megatron-r1 eval` (process groups, tokenizer, template); written once so that a fix (a clearer
error, a new data option such as `data.skip_bad_rows`) reaches every stage, and the stages read as their method.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Literal

from megatron_r1.config import Config
from megatron_r1.data import load_dataset
from megatron_r1.data.templates import get_template
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.errors import ConfigError, DataError
from megatron_r1.parallel import ParallelContext, init_parallel


def check_vocab(cfg: Config, tokenizer) -> None:
    """The model must have an embedding row for every token id the tokenizer can produce."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}, {cfg.tokenizer.path})")


def num_microbatches(cfg: Config, dp_size: int) -> int:
    """Micro-batches per optimizer step on each DP rank: the global batch over (micro-batch size x DP)."""
    t = cfg.training
    if t.global_batch_size % (t.micro_batch_size * dp_size) != 0:
        raise ConfigError(f"training.global_batch_size: {t.global_batch_size} is not a multiple of "
                          f"micro_batch_size × data-parallel size ({t.micro_batch_size}×{dp_size})")
    return t.global_batch_size // (t.micro_batch_size * dp_size)


@dataclass
class StageStart:
    """A stage's parallel context and tokenizer; its template and samples on first use (pre-training needs
    neither)."""

    cfg: Config
    ctx: ParallelContext
    tokenizer: object

    @cached_property
    def template(self):
        return get_template(self.cfg.data.template, self.tokenizer)

    def samples(self, split: Literal["train", "test"], loader: Callable | None = None) -> list:
        """The stage's rows of `split`: training rows from `data.source` (none is an error), held-out rows from
        `data.eval_source` or else `data.source`'s test split (may be empty). `loader` has `load_dataset`'s
        signature; the reward-model trainer passes its preference loader."""
        loader = loader if loader is not None else load_dataset
        d = self.cfg.data
        source = d.source if split == "train" else (d.eval_source or d.source)
        rows = loader(source, field_map=d.field_map or None, split=split, skip_bad_rows=d.skip_bad_rows,
                      **d.options)
        if split == "train" and not rows:
            raise DataError(f"{source}: no training samples (data.source)")
        return rows


def start_stage(cfg: Config) -> StageStart:
    """init_parallel -> tokenizer -> vocabulary check: the first lines of every training stage."""
    ctx = init_parallel(cfg.parallel, cfg.training.seed)
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    check_vocab(cfg, tokenizer)
    return StageStart(cfg, ctx, tokenizer)
