"""`megatron-r1 distill CONFIG [section.key=value ...]`: distil an R1 checkpoint into a dense student by SFT.

As in the report: the teacher's answers (generated here, filtered like stage 3, and/or reused from stage 3's jsonl)
become plain (prompt, completion) text, so the student keeps its own tokenizer and architecture (a `qwen2` /
`llama` preset); no RL. The student is then evaluated with `megatron-r1 eval` (pass@1 over k samples, cons@k).

CONFIG is the student's `stage: sft` config plus a `distill:` section (`DistillOptions`); the teacher's model and
tokenizer come from its checkpoint's config.yaml, so nothing about the teacher is repeated here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megatron_r1.config import Config, config_from_dict
from megatron_r1.data import load_dataset
from megatron_r1.errors import CheckpointError, ConfigError, DataError
from megatron_r1.logging import get_logger
from megatron_r1.parallel.runtime import current_context
from megatron_r1.pipeline.files import write_jsonl
from megatron_r1.pipeline.rejection_sampling import SamplingOptions, print_summary, run_sampling
from megatron_r1.pipeline.sections import parse_command_line, parse_section
from megatron_r1.rl.evaluate import main as eval_main
from megatron_r1.sft.trainer import run_sft

log = get_logger()


@dataclass
class DistillEval:
    """Evaluation of the student with `megatron-r1 eval` after training."""

    enabled: bool = True
    dataset: Optional[str] = None  # None: the prompts' source
    num_problems: int = 64
    k: int = 4
    temperature: float = 0.6  # R1's evaluation setting
    top_p: float = 0.95
    max_new_tokens: Optional[int] = None  # None: the student's rl.max_response_length


@dataclass
class DistillOptions:
    """The `distill:` section."""

    teacher: Optional[str] = None  # teacher checkpoint directory; None = reuse `data` only
    data: list = field(default_factory=list)  # jsonl files reused as-is (e.g. stage 3's samples.jsonl)
    prompts: Optional[str] = None  # source of prompts for the teacher (needs answers); None = data.source
    prompt_options: dict = field(default_factory=dict)  # generator options of a builtin prompt source
    sampling: dict = field(default_factory=dict)  # SamplingOptions for the teacher (n, filters, ...)
    output: Optional[str] = None  # the training jsonl; None = <logging.run_dir>/distill_data.jsonl
    eval: DistillEval = field(default_factory=DistillEval)


def teacher_config(teacher: str, prompts: str, prompt_options: dict, run_dir: str) -> Config:
    """The teacher's own config (model, tokenizer, template, layout) from its checkpoint, aimed at `prompts`."""
    from megatron_r1.checkpoint import checkpoint_config_yaml

    text = checkpoint_config_yaml(teacher)
    if text is None:
        raise CheckpointError(f"{teacher}: no config.yaml beside the checkpoint (distill.teacher)")
    data = yaml.safe_load(text)
    data["data"] = {**data.get("data", {}), "source": prompts, "options": dict(prompt_options), "field_map": {},
                    "eval_source": None}
    data["logging"] = {**data.get("logging", {}), "run_dir": run_dir}
    data["checkpoint"] = {**data.get("checkpoint", {}), "load": teacher, "save": None}
    return config_from_dict(data, source=f"{teacher} config.yaml")


def build_distill_data(cfg: Config, opts: DistillOptions) -> tuple[Path, dict]:
    """Write the student's training jsonl (teacher answers + reused rows); return its path and a summary."""
    if not opts.teacher and not opts.data:
        raise ConfigError("distill: give a teacher checkpoint (distill.teacher) and/or data to reuse (distill.data)")
    run_dir = Path(cfg.logging.run_dir)
    out = Path(opts.output) if opts.output else run_dir / "distill_data.jsonl"
    summary: dict = {"reused": {}, "teacher": None}
    rows: list[dict] = []
    if opts.teacher:
        prompts = opts.prompts or cfg.data.source
        tcfg = teacher_config(opts.teacher, prompts, opts.prompt_options, str(run_dir / "teacher"))
        sampling = parse_section(SamplingOptions, dict(opts.sampling), "distill.sampling")
        sampling.output = str(run_dir / "teacher" / "samples.jsonl")
        result = run_sampling(tcfg, sampling, allow_empty=True)  # reused data may still fill the set
        summary["teacher"] = result.as_dict()
        print_summary(result, current_context().rank == 0)
        rows += [json.loads(line) for line in Path(result.output).read_text(encoding="utf-8").splitlines() if line]
    for path in opts.data:
        reused = load_dataset(path, split="train")
        summary["reused"][str(path)] = len(reused)
        rows += [dict(r) for r in reused]
    if not rows:
        raise DataError("distill: no training rows (the teacher kept nothing and no data was reused)")
    if current_context().rank == 0:
        write_jsonl(rows, out)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # the student's SFT reads the file on every rank
    summary["rows"] = len(rows)
    summary["output"] = str(out)
    return out, summary


def evaluate_student(cfg: Config, opts: DistillOptions) -> dict:
    """`megatron-r1 eval` on the student's final checkpoint; returns its JSON (also saved as student_eval.json)."""
    e = opts.eval
    out = Path(cfg.logging.run_dir) / "student_eval.json"
    dataset = e.dataset or opts.prompts
    if not dataset:
        raise ConfigError("distill.eval.dataset: nothing to evaluate on (set it, or distill.prompts)")
    argv = ["--load", str(cfg.checkpoint.save), "--dataset", dataset, "--k", str(e.k),
            "--num-problems", str(e.num_problems), "--temperature", str(e.temperature), "--top-p", str(e.top_p),
            "--output", str(out)]
    if e.max_new_tokens:
        argv += ["--max-new-tokens", str(e.max_new_tokens)]
    eval_main(argv)
    return json.loads(out.read_text())


def run_distill(cfg: Config, opts: DistillOptions) -> dict:
    """Teacher data -> student SFT (resumable like any SFT stage) -> student evaluation. Returns a summary."""
    if cfg.stage != "sft":
        raise ConfigError(f"stage: distillation trains the student by SFT; set stage: sft (got {cfg.stage!r})")
    if not cfg.checkpoint.save:
        raise ConfigError("checkpoint.save: the student's checkpoints need a directory")
    run_dir = Path(cfg.logging.run_dir)
    data_file = run_dir / "distill_data.jsonl" if not opts.output else Path(opts.output)
    summary_file = run_dir / "distill_data.summary.json"
    # A resumed run reuses the data it already generated: regenerating could change it under a half-trained student.
    if data_file.exists() and summary_file.exists():
        summary = json.loads(summary_file.read_text())
        log.info("distill: reusing %s (%d rows)", data_file, summary.get("rows", 0))
    else:
        data_file, summary = build_distill_data(cfg, opts)

        if current_context().rank == 0:
            summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    cfg.data.source = str(data_file)
    cfg.data.options = {}
    cfg.data.field_map = {}
    cfg.data.eval_source = None
    train = run_sft(cfg)
    result = {"data": summary, "train": train}
    if opts.eval.enabled:
        result["eval"] = evaluate_student(cfg, opts)
    return result


def main(argv: list[str]) -> int:
    cfg, opts = parse_command_line(argv, "megatron-r1 distill", __doc__, "distill", DistillOptions,
                                   "YAML: the student's sft config plus a `distill:` section",
                                   "section.key=value (distill.teacher=DIR, model.preset=llama_tiny)")
    result = run_distill(cfg, opts)
    print(json.dumps({k: result[k] for k in ("eval",) if k in result} | {"rows": result["data"].get("rows")},
                     indent=2))
    return 0
