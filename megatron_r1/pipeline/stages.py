"""The pipeline file and its stages: parsing, `${stage.product}` references, markers, running one stage.

A pipeline file has `run_dir`, `defaults` (Config sections shared by every stage) and an ordered list of `stages`:

    - name: cold_start            # also the stage's directory: <run_dir>/<name>/
      type: train                 # train (any `stage:` of megatron-r1 train) | sample | distill
      init_from: base             # an earlier stage whose final checkpoint initialises this one (weights only)
      config: {stage: sft, ...}   # Config sections, merged over `defaults`
      sampling: {...}             # type sample: SamplingOptions
      distill: {...}              # type distill: DistillOptions
      mixture: {...}              # optional: a prompt mixture written to <name>/prompts.jsonl as data.source

Merging is deep, except that a stage's `model` and `tokenizer` sections replace the defaults' whole: a student of
another architecture must not inherit fields of the teacher's (MLA ranks on a Qwen2, say).

Strings may name what an earlier stage produced: `${NAME.checkpoint}` (its checkpoint directory), `${NAME.data}`
(its data file: samples for `sample`, the training set for `distill`, the prompt mixture of a `mixture` stage),
`${NAME.dir}`, `${run_dir}`, and `${config_dir}` (the pipeline file's directory, for files shipped beside it).

The pipeline owns each stage's paths: logging.run_dir = <run_dir>/<name>, checkpoint.save = <that>/checkpoints.
A stage that finished writes <run_dir>/<name>/STAGE_DONE.json atomically after its final checkpoint; a re-run
skips it. A stage without a marker is (re)run: the trainers resume from their checkpoint.save by themselves.
"""
from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_r1.config import config_from_dict, parse_override, read_yaml
from megatron_r1.errors import ConfigError
from megatron_r1.pipeline.files import atomic_open
from megatron_r1.pipeline.mixture import parse_mixture, write_mixture
from megatron_r1.pipeline.sections import parse_section

STAGE_TYPES = ("train", "sample", "distill")
MARKER = "STAGE_DONE.json"
_REF = re.compile(r"\$\{([A-Za-z0-9_]+)(?:\.([a-z]+))?\}")
_REPLACED_SECTIONS = ("model", "tokenizer")
_STAGE_KEYS = {"name", "type", "init_from", "config", "sampling", "distill", "mixture"}


@dataclass
class StageSpec:
    """One stage as resolved from the pipeline file: its final Config dict and its own sections."""

    name: str
    type: str
    index: int
    dir: Path
    config: dict  # Config sections, references resolved, paths set by the pipeline
    sampling: Optional[dict] = None
    distill: Optional[dict] = None
    mixture: Optional[dict] = None
    init_from: Optional[str] = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def data_file(self) -> Optional[Path]:
        if self.type == "sample":
            return self.dir / "samples.jsonl"
        if self.type == "distill":
            return self.dir / "distill_data.jsonl"
        if self.mixture is not None:
            return self.dir / "prompts.jsonl"
        return None

    @property
    def marker(self) -> Path:
        return self.dir / MARKER

    def fingerprint(self) -> str:
        """What decides the stage's result; a finished stage whose fingerprint changed is not silently reused."""
        blob = json.dumps({"type": self.type, "config": self.config, "sampling": self.sampling,
                           "distill": self.distill, "mixture": self.mixture, "init_from": self.init_from},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PipelineSpec:
    run_dir: Path
    stages: list = field(default_factory=list)  # of StageSpec
    source: str = "pipeline"

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"{self.source}: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")


# ------------------------------------------------------------------------------------------------ parsing
def deep_merge(base: dict, over: dict, replace: tuple = ()) -> dict:
    out = dict(base)
    for k, v in over.items():
        if k not in replace and isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _substitute(value: Any, products: dict, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute(v, products, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, products, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, what = m.group(1), m.group(2)
        if name in ("run_dir", "config_dir") and what is None:
            return str(products[name])
        if name not in products:
            raise ConfigError(f"{where}: ${{{name}...}} refers to no earlier stage (known: "
                              f"{', '.join(k for k in products if k != 'run_dir') or 'none'})")
        stage: StageSpec = products[name]
        if what == "checkpoint":
            return str(stage.checkpoint_dir)
        if what == "dir":
            return str(stage.dir)
        if what == "data":
            if stage.data_file is None:
                raise ConfigError(f"{where}: stage {name!r} ({stage.type}) produces no data file")
            return str(stage.data_file)
        raise ConfigError(f"{where}: unknown product {what!r} of stage {name!r} (use checkpoint, data or dir)")

    return _REF.sub(one, value)


def _apply_overrides(raw: dict, overrides: list[str], names: set[str], source: str) -> None:
    """`NAME.section.key=v` -> that stage (`config`, or its sampling/distill/mixture section);
    `run_dir=v`; anything else -> `defaults`."""
    stages = {s.get("name"): s for s in raw.get("stages", []) if isinstance(s, dict)}
    for text in overrides:
        keys, value = parse_override(text)
        if keys == ["run_dir"]:
            raw["run_dir"] = value
            continue
        if keys[0] in names:
            node = stages[keys[0]]
            keys = keys[1:]
            if keys and keys[0] not in ("sampling", "distill", "mixture", "init_from"):
                node = node.setdefault("config", {})
        else:
            if keys[0] == "defaults":
                keys = keys[1:]
            node = raw.setdefault("defaults", {})
        if not keys:
            raise ConfigError(f"{source}: override {text!r}: no key")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {text!r}: {k} is not a section")
        node[keys[-1]] = value


def parse_pipeline(raw: dict, source: str = "pipeline", overrides: list[str] = (),
                   config_dir: Optional[Path] = None) -> PipelineSpec:
    """Resolve a pipeline mapping into stages with final configs; every mistake names the stage and field."""
    raw = copy.deepcopy(raw)
    unknown = sorted(set(raw) - {"run_dir", "defaults", "stages"})
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {', '.join(unknown)} (run_dir, defaults, stages)")
    if not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise ConfigError(f"{source}: stages: expected a non-empty list")
    names = [s.get("name") if isinstance(s, dict) else None for s in raw["stages"]]
    _apply_overrides(raw, list(overrides), {n for n in names if n}, source)
    run_dir = Path(str(raw.get("run_dir") or "runs/r1")).resolve()
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: expected a mapping")
    products: dict = {"run_dir": run_dir, "config_dir": (config_dir or Path.cwd()).resolve()}
    spec = PipelineSpec(run_dir, [], source)
    for i, s in enumerate(raw["stages"]):
        where = f"{source}: stages[{i}]"
        if not isinstance(s, dict):
            raise ConfigError(f"{where}: expected a mapping")
        name = s.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ConfigError(f"{where}.name: a stage needs a name of letters, digits and _ (got {name!r})")
        where = f"{source}: stage {name}"
        if name in products:
            raise ConfigError(f"{where}: the name is used twice")
        bad = sorted(set(s) - _STAGE_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(bad)} (allowed: {', '.join(sorted(_STAGE_KEYS))})")
        stype = s.get("type", "train")
        if stype not in STAGE_TYPES:
            raise ConfigError(f"{where}.type: unknown type {stype!r} (choose from {', '.join(STAGE_TYPES)})")
        init_from = s.get("init_from")
        if init_from is not None and init_from not in products:
            raise ConfigError(f"{where}.init_from: {init_from!r} is not an earlier stage")
        for section in ("sampling", "distill"):
            if s.get(section) is not None and stype != section.replace("sampling", "sample"):
                raise ConfigError(f"{where}.{section}: only a stage of type "
                                  f"{section.replace('sampling', 'sample')} has this section")
        stage_dir = run_dir / name
        config = deep_merge(defaults, s.get("config") or {}, replace=_REPLACED_SECTIONS)
        config = _substitute(config, products, f"{where}.config")
        stage = StageSpec(name=name, type=stype, index=i, dir=stage_dir, config=config, init_from=init_from,
                          sampling=_substitute(s.get("sampling"), products, f"{where}.sampling"),
                          distill=_substitute(s.get("distill"), products, f"{where}.distill"),
                          mixture=_substitute(s.get("mixture"), products, f"{where}.mixture"))
        _own_paths(stage, products)
        products[name] = stage
        spec.stages.append(stage)
    return spec


def _own_paths(stage: StageSpec, products: dict) -> None:
    c = stage.config
    c["logging"] = {**c.get("logging", {}), "run_dir": str(stage.dir)}
    ck = dict(c.get("checkpoint", {}))
    if stage.type in ("train", "distill"):
        ck["save"] = str(stage.checkpoint_dir)
    if stage.init_from is not None:
        ck.update(load=str(products[stage.init_from].checkpoint_dir), finetune=True, load_optimizer=False)
    c["checkpoint"] = ck
    if stage.type == "sample":
        stage.sampling = dict(stage.sampling or {}, output=str(stage.data_file))
    if stage.type == "distill":
        stage.distill = dict(stage.distill or {}, output=str(stage.data_file))
    if stage.mixture is not None:
        c["data"] = {**c.get("data", {}), "source": str(stage.data_file), "options": {}}


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> PipelineSpec:
    return parse_pipeline(read_yaml(path), str(path), list(overrides), Path(path).parent)


# ------------------------------------------------------------------------------------------------ markers
def read_marker(stage: StageSpec) -> Optional[dict]:
    if not stage.marker.is_file():
        return None
    try:
        return json.loads(stage.marker.read_text())
    except json.JSONDecodeError:
        return None  # cannot happen with the atomic write; treat as unfinished rather than trusting it


def write_marker(stage: StageSpec, summary: dict, seconds: float) -> None:
    """Atomic (write beside, then rename): the marker exists only once the stage's outputs are final."""
    body = {"stage": stage.name, "type": stage.type, "fingerprint": stage.fingerprint(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 1), "summary": summary}
    with atomic_open(stage.marker) as f:
        f.write(json.dumps(body, indent=2, default=_jsonable) + "\n")


def _jsonable(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


# ------------------------------------------------------------------------------------------------ running
def build_config(stage: StageSpec):
    return config_from_dict(stage.config, source=f"stage {stage.name}")


def check_sections(stage: StageSpec) -> None:
    """Parse the stage's own sections (sampling / distill / mixture) so their mistakes surface before any run."""
    where = f"stage {stage.name}"
    if stage.type == "sample":
        from megatron_r1.pipeline.rejection_sampling import SamplingOptions

        parse_section(SamplingOptions, dict(stage.sampling or {}), f"{where}.sampling").validate(f"{where}.sampling")
    if stage.type == "distill":
        from megatron_r1.pipeline.distill import DistillOptions

        parse_section(DistillOptions, dict(stage.distill or {}), f"{where}.distill")
    if stage.mixture is not None:
        parse_mixture(stage.mixture, f"{where}.mixture")


def run_stage(stage: StageSpec) -> dict:
    """Run one stage in this process (every rank calls it); returns its summary for the marker and report."""
    cfg = build_config(stage)
    if stage.mixture is not None:
        # Deterministic (seeded), so a resumed stage writes the same prompts again; rank 0 writes, others wait.
        counts = write_mixture(stage.mixture, stage.data_file, f"stage {stage.name}.mixture") \
            if _rank() == 0 else None
        _barrier()
    else:
        counts = None
    if stage.type == "train":
        from megatron_r1.training.cli import STAGE_RUNNERS

        module_name, func_name = STAGE_RUNNERS[cfg.stage].split(":")
        metrics = getattr(importlib.import_module(module_name), func_name)(cfg)
        summary = {"stage": cfg.stage, "last": metrics or {}}
        if counts is not None:
            summary["mixture"] = counts
        return summary
    if stage.type == "sample":
        from megatron_r1.pipeline.rejection_sampling import SamplingOptions, print_summary, run_sampling

        opts = parse_section(SamplingOptions, copy.deepcopy(stage.sampling), f"stage {stage.name}.sampling")
        result = run_sampling(cfg, opts)
        print_summary(result, _rank() == 0)
        return result.as_dict()
    from megatron_r1.pipeline.distill import DistillOptions, run_distill

    opts = parse_section(DistillOptions, copy.deepcopy(stage.distill), f"stage {stage.name}.distill")
    return run_distill(cfg, opts)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
