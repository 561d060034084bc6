"""R1 stage 3 data: `megatron-r1 sample CONFIG [section.key=value ...]` — rejection sampling.

Draw `n` answers per prompt from a checkpoint with the in-engine generator, keep only correct ones, drop
mixed-language CoT, overlong paragraphs, code blocks and repetitions (see `filters.py`), mix in non-reasoning SFT
data at `general_ratio`, and write jsonl rows ready for `stage: sft` (`prompt`, `completion`, ...) with their
provenance (checkpoint, prompt id, scores). Prints what each filter removed.

CONFIG is a normal stage config (model, tokenizer, parallel, data = the prompts, generation, checkpoint.load =
the model to sample) plus a `sampling:` section parsed into `SamplingOptions` (see sections.py for why it lives
beside the Config rather than inside it).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_r1.config import Config
from megatron_r1.data import load_dataset
from megatron_r1.errors import CheckpointError, ConfigError, DataError
from megatron_r1.logging import get_logger
from megatron_r1.models import build_model
from megatron_r1.parallel.runtime import current_context
from megatron_r1.pipeline.files import write_jsonl
from megatron_r1.pipeline.filters import FilterStats, FilterThresholds, measure, select_answers
from megatron_r1.pipeline.sections import parse_command_line
from megatron_r1.reward_model.preferences import generate_preferences
from megatron_r1.rewards import get_reward
from megatron_r1.rewards.language import check_language
from megatron_r1.rl.rollout import sample_group_rollouts
from megatron_r1.sft.data import response_text
from megatron_r1.training.prologue import start_stage

log = get_logger()


@dataclass
class SamplingOptions:
    """The `sampling:` section."""

    checkpoint: Optional[str] = None  # the model sampled; None = checkpoint.load of the config
    output: Optional[str] = None  # jsonl written; None = <logging.run_dir>/samples.jsonl
    num_prompts: Optional[int] = None  # first N prompts of data.source; None = all
    n: int = 4  # answers drawn per prompt
    temperature: Optional[float] = None  # None = generation.temperature
    max_new_tokens: Optional[int] = None  # None = rl.max_response_length
    batch_prompts: int = 16  # prompts per generate() call (× n sequences)
    seed: int = 0
    max_per_prompt: Optional[int] = None  # distinct correct answers kept per prompt; None = all
    language: str = "en"  # target language of the CoT when a prompt has no `language` field
    min_language_consistency: float = 0.95  # share of reasoning words in the target language
    max_paragraph_chars: int = 2000
    reject_code_blocks: bool = True
    repetition_ngram: int = 4
    max_repeated_ngram_fraction: float = 0.3
    require_format: bool = True  # R1 also keeps only well-formed (tagged) answers
    # Non-reasoning SFT data (R1: ~200k non-reasoning beside ~600k reasoning samples, i.e. ratio 1/3).
    general_source: Optional[str] = None  # builtin:preferences (its `chosen` answers) or a jsonl with completions
    general_options: dict = field(default_factory=dict)  # generator options of a builtin general source
    general_ratio: float = 1 / 3  # general samples per kept reasoning sample
    # A floor on general samples: a barely trained model (the CPU pipeline) may keep no reasoning answer at all,
    # and the SFT that follows still needs rows. 0 in real runs: the ratio alone decides.
    min_general_samples: int = 0

    def thresholds(self, think_only: bool) -> FilterThresholds:
        return FilterThresholds(
            min_language_consistency=self.min_language_consistency, max_paragraph_chars=self.max_paragraph_chars,
            reject_code_blocks=self.reject_code_blocks, repetition_ngram=self.repetition_ngram,
            max_repeated_ngram_fraction=self.max_repeated_ngram_fraction, require_format=self.require_format,
            think_only=think_only)

    def validate(self, where: str = "sampling") -> None:
        if self.n < 1:
            raise ConfigError(f"{where}.n: must be >= 1, got {self.n}")
        if self.batch_prompts < 1:
            raise ConfigError(f"{where}.batch_prompts: must be >= 1, got {self.batch_prompts}")
        if not 0.0 <= self.min_language_consistency <= 1.0:
            raise ConfigError(f"{where}.min_language_consistency: must be in [0, 1], got "
                              f"{self.min_language_consistency}")
        if self.general_ratio < 0 or self.min_general_samples < 0:
            raise ConfigError(f"{where}.general_ratio / min_general_samples: must be >= 0")
        if self.min_general_samples > 0 and not self.general_source:
            raise ConfigError(f"{where}.general_source: needed for min_general_samples={self.min_general_samples}")

        check_language(self.language)


@dataclass
class SamplingResult:
    """What a sampling run produced (also written beside the jsonl as <output>.stats.json)."""

    output: str
    checkpoint: str
    prompts: int
    reasoning_rows: int
    general_rows: int
    stats: FilterStats

    def as_dict(self) -> dict:
        fields = ("output", "checkpoint", "prompts", "reasoning_rows", "general_rows")
        return {**{k: getattr(self, k) for k in fields}, "drawn": self.stats.drawn, "kept": self.stats.kept,
                "removed": dict(self.stats.removed)}


# ------------------------------------------------------------------------------------------------ the model
def build_generator(cfg: Config, checkpoint: str, max_new_tokens: int):
    """(engine, tokenizer, template, parallel context) for the checkpoint in `checkpoint`, laid out as
    `cfg.parallel`."""
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.inference import Engine

    stage = start_stage(cfg)
    tokenizer = stage.tokenizer
    model = build_model(cfg.model, cfg.parallel, cfg.training.precision)
    load_model_only(model, checkpoint)
    model.eval()
    g = cfg.generation  # the same cache settings as GRPO's engine (and megatron-r1 plan's accounting)
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=g.max_batch_size,
                    max_seq_len=cfg.rl.max_prompt_length + max_new_tokens + 1, kv_cache=g.kv_cache,
                    kv_block_size=g.kv_block_size, kv_cache_blocks=g.kv_cache_blocks,
                    kv_cache_memory_gb=g.kv_cache_memory_gb)
    return engine, tokenizer, stage.template, stage.ctx


def _max_new(cfg: Config, opts: SamplingOptions) -> int:
    return opts.max_new_tokens or cfg.rl.max_response_length


def _resolved_checkpoint(cfg: Config, opts: SamplingOptions) -> str:
    from megatron_r1.checkpoint import latest_checkpoint

    ckpt = opts.checkpoint or cfg.checkpoint.load
    if not ckpt:
        raise ConfigError("sampling.checkpoint: no model to sample from (set sampling.checkpoint or checkpoint.load)")
    resolved = latest_checkpoint(ckpt)
    if resolved is None and not (Path(ckpt) / "metadata.json").exists():
        raise CheckpointError(f"{ckpt}: no checkpoint to sample from (no `latest` file) (sampling.checkpoint)")
    return str(resolved or ckpt)


# ------------------------------------------------------------------------------------------------ sampling
def _gather_rows(rows: list, ctx) -> list:
    """Every DP rank's rows, in rank order, on every rank (the TP peers and pipeline stages of a DP rank generate
    together and hold identical rows)."""
    import torch.distributed as dist

    if ctx.world_size == 1:
        return rows
    everyone: list = [None] * ctx.world_size
    dist.all_gather_object(everyone, (ctx.dp_rank, ctx.tp_rank, ctx.pp_rank, rows))
    out = []
    for _dp_rank, tp_rank, pp_rank, part in sorted(everyone, key=lambda x: (x[0], x[1], x[2])):
        if tp_rank == 0 and pp_rank == 0:
            out.extend(part)
    return out


def sample_reasoning(cfg: Config, opts: SamplingOptions, checkpoint: str, prompts: list[dict]
                     ) -> tuple[list[dict], FilterStats]:
    """Draw, score and filter; returns the kept rows (with provenance) and the filter counts over all ranks."""
    max_new = _max_new(cfg, opts)
    engine, tokenizer, template, ctx = build_generator(cfg, checkpoint, max_new)
    thresholds = opts.thresholds(template.think_only)
    temperature = cfg.generation.temperature if opts.temperature is None else opts.temperature
    # DP ranks split the prompts; the TP peers and pipeline stages of one DP rank generate together (the engine is
    # a collective there).
    mine = [(i, p) for i, p in enumerate(prompts) if i % ctx.dp_size == ctx.dp_rank]
    accuracy = get_reward("accuracy")
    rows: list[dict] = []
    stats = FilterStats()
    try:
        for start in range(0, len(mine), opts.batch_prompts):
            chunk = mine[start:start + opts.batch_prompts]
            # Seeds derive from the chunk's first global prompt index: a re-run with the same layout draws the same.
            batch = sample_group_rollouts(engine, tokenizer, template, [p for _, p in chunk], opts.n,
                                          cfg.generation, max_new, opts.seed * 7919 + chunk[0][0],
                                          temperature=temperature)
            acc = accuracy(batch.texts, batch.samples)
            for k, (index, prompt) in enumerate(chunk):
                block = range(k * opts.n, (k + 1) * opts.n)
                texts = [batch.texts[j] for j in block]
                language = prompt.get("language") or opts.language
                scores = [measure(texts[m], acc[j], language, thresholds) for m, j in enumerate(block)]
                kept, s = select_answers(texts, scores, thresholds, opts.max_per_prompt)
                stats.add(s)
                pid = str(prompt.get("id", index))
                for m in kept:
                    rows.append({
                        "id": f"{pid}-s{m}", "prompt": prompt["prompt"], "completion": texts[m],
                        "answer": str(prompt.get("answer", "")), "kind": "reasoning",
                        **({"language": prompt["language"]} if prompt.get("language") else {}),
                        "provenance": {"checkpoint": checkpoint, "prompt_id": pid, "prompt_index": index,
                                       "source": cfg.data.source, "sample_index": m, "temperature": temperature,
                                       "seed": opts.seed, "scores": scores[m].as_dict()},
                    })
    finally:
        close = getattr(accuracy, "close", None)
        if close is not None:
            close()
    all_rows = _gather_rows(rows, ctx)
    all_stats = FilterStats()
    for s in _gather_rows([stats], ctx):
        all_stats.add(s)
    return all_rows, all_stats


# ------------------------------------------------------------------------------------------------ general data
def load_general(source: str, count: int, options: dict, seed: int) -> list[dict]:
    """`count` non-reasoning SFT rows (prompt, completion) from `source`, with provenance.

    `builtin:preferences` contributes its preferred answers (helpful and harmless replies); any other source must
    carry a `completion`/`response` per row (as an SFT set does)."""
    if count <= 0:
        return []
    if source == "builtin:preferences":
        pool = [{"id": r["id"], "prompt": r["prompt"], "completion": r["chosen"], "subkind": r["kind"]}
                for r in generate_preferences(num_samples=max(count, int(options.get("num_samples", 0))),
                                              seed=int(options.get("seed", seed)), split="train")]
    else:
        pool = []
        for i, r in enumerate(load_dataset(source, split="train", **options)):
            pool.append({"id": str(r.get("id", i)), "prompt": r["prompt"],
                         "completion": response_text(r, f"{source}: row {r.get('id', i)} (sampling.general_source)")})
    if len(pool) < count:
        raise DataError(f"{source}: only {len(pool)} general rows, {count} needed (sampling.general_ratio / "
                        f"min_general_samples)")
    random.Random(f"general:{seed}").shuffle(pool)
    return [dict(r, id=f"general-{r['id']}", kind="general", provenance={"source": source, "prompt_id": r["id"]})
            for r in pool[:count]]


# ------------------------------------------------------------------------------------------------ the job
def output_path(cfg: Config, opts: SamplingOptions) -> Path:
    return Path(opts.output) if opts.output else Path(cfg.logging.run_dir) / "samples.jsonl"


def run_sampling(cfg: Config, opts: SamplingOptions, allow_empty: bool = False) -> SamplingResult:
    """The whole stage-3 data job; every rank calls it, rank 0 writes the files. An empty result is an error
    (the SFT after it would have nothing to train on) unless `allow_empty`."""
    opts.validate()
    checkpoint = _resolved_checkpoint(cfg, opts)
    prompts = load_dataset(cfg.data.source, field_map=cfg.data.field_map or None, split="train",
                           skip_bad_rows=cfg.data.skip_bad_rows, **cfg.data.options)
    if opts.num_prompts is not None:
        prompts = prompts[:opts.num_prompts]
    if not prompts:
        raise DataError(f"{cfg.data.source}: no prompts to sample (data.source)")
    missing = [p.get("id", i) for i, p in enumerate(prompts) if p.get("answer") in (None, "")]
    if missing:
        raise DataError(f"{cfg.data.source}: prompt {missing[0]} has no `answer`; rejection sampling keeps only "
                        f"verifiably correct answers ({len(missing)} such prompts)")
    reasoning, stats = sample_reasoning(cfg, opts, checkpoint, prompts)
    n_general = max(opts.min_general_samples, round(opts.general_ratio * len(reasoning))) if opts.general_source \
        else 0
    general = load_general(opts.general_source, n_general, dict(opts.general_options), opts.seed) \
        if opts.general_source else []
    rows = reasoning + general
    # Interleave so that an SFT run cut short (or one epoch's first steps) still sees the configured mix.
    random.Random(f"mix:{opts.seed}").shuffle(rows)
    out = output_path(cfg, opts)
    result = SamplingResult(str(out), checkpoint, len(prompts), len(reasoning), len(general), stats)

    if current_context().rank == 0:
        write_jsonl(rows, out)
        stats_file = out.with_name(out.name + ".stats.json")
        stats_file.write_text(json.dumps({**result.as_dict(), "options": asdict(opts)}, indent=2) + "\n")
    _barrier()
    if not rows and not allow_empty:
        raise DataError(f"sampling: nothing kept from {len(prompts)} prompts × {opts.n} answers and no general data "
                        f"(see the filter table; set sampling.general_source / min_general_samples)")
    return result


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def print_summary(result: SamplingResult, rank0: bool = True) -> None:
    if not rank0:
        return
    print(f"rejection sampling from {result.checkpoint}: {result.prompts} prompts × "
          f"{result.stats.drawn // max(1, result.prompts)} answers")
    print(result.stats.table())
    print(f"wrote {result.reasoning_rows} reasoning + {result.general_rows} general rows -> {result.output}")


def main(argv: list[str]) -> int:
    cfg, opts = parse_command_line(argv, "megatron-r1 sample", __doc__, "sampling", SamplingOptions,
                                   "YAML: a stage config plus a `sampling:` section",
                                   "section.key=value (sampling.n=8, checkpoint.load=DIR, ...)")
    result = run_sampling(cfg, opts)
    print_summary(result, current_context().rank == 0)
    return 0
