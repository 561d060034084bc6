"""`megatron-r1 pipeline PIPELINE.yaml [overrides] [--until NAME] [--dry-run]`: the R1 stages, in order, resumable.

Stages run one after another in this process (each calls init_parallel again, which re-creates Megatron's groups
for its layout); under torchrun every rank runs the pipeline together. Running in-process keeps the start-up cost
(torch + Megatron imports, process-group setup) to once per pipeline and lets a test kill the whole job at a step.

A finished stage (STAGE_DONE.json present) is skipped; if its resolved config has changed since, the run stops
and says so rather than silently reusing outputs made from another config. An unfinished stage is run again and
its trainer resumes from its own last checkpoint. At the end: <run_dir>/report.md and report.png.

Overrides: `NAME.section.key=value` (one stage's config; `NAME.sampling.n=8` for its own section),
`section.key=value` (the defaults of every stage), `run_dir=DIR`.
"""
from __future__ import annotations

import argparse
import time

from megatron_r1.errors import ConfigError
from megatron_r1.logging import get_logger
from megatron_r1.pipeline.report import write_report
from megatron_r1.pipeline.stages import (
    _barrier,
    _rank,
    build_config,
    check_sections,
    load_pipeline,
    read_marker,
    run_stage,
    write_marker,
)

log = get_logger()


def _say(text: str) -> None:
    if _rank() == 0:
        print(f"[pipeline] {text}", flush=True)


def run_pipeline(spec, until: str | None = None) -> list[dict]:
    """Run (or skip) each stage up to `until`; write the report; return the markers of the stages covered."""
    stages = spec.stages
    if until is not None:
        last = spec.stage(until).index
        stages = stages[: last + 1]
    markers = []
    for stage in stages:
        label = f"{stage.index + 1}/{len(spec.stages)} {stage.name} ({stage.type})"
        done = read_marker(stage)
        if done is not None:
            if done.get("fingerprint") != stage.fingerprint():
                raise ConfigError(
                    f"{spec.source}: stage {stage.name} finished with a different configuration "
                    f"({stage.marker}); to redo it with the new one, delete {stage.dir} (and the stages after it)")
            _say(f"{label}: done on {done.get('finished')}, skipped")
            markers.append(done)
            continue
        _say(f"{label}: running -> {stage.dir}")
        t0 = time.time()
        summary = run_stage(stage)
        seconds = time.time() - t0
        _barrier()  # every rank's share of the final checkpoint is committed before the marker says so
        if _rank() == 0:
            write_marker(stage, summary, seconds)
        _barrier()
        _say(f"{label}: finished in {seconds:.0f} s")
        markers.append(read_marker(stage) or {"stage": stage.name, "summary": summary})
    if _rank() == 0:
        md, png = write_report(spec, stages)
        _say(f"report: {md} and {png}")
    _barrier()
    return markers


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipeline", help="pipeline YAML (examples/pipelines/r1.yaml)")
    ap.add_argument("overrides", nargs="*", help="NAME.section.key=value | section.key=value | run_dir=DIR")
    ap.add_argument("--until", default=None, help="stop after this stage (and write the report so far)")
    ap.add_argument("--dry-run", action="store_true", help="resolve and validate every stage's config; run nothing")
    args = ap.parse_intermixed_args(argv)
    spec = load_pipeline(args.pipeline, args.overrides)
    if args.dry_run:
        for stage in spec.stages:
            cfg = build_config(stage)  # validates: a typo in the last stage fails now, not hours in
            check_sections(stage)
            state = "done" if read_marker(stage) else "to run"
            start = stage.init_from or (cfg.checkpoint.load if stage.type != "distill" else None)
            extra = f" from {start}" if start else ""
            kind = cfg.stage if stage.type != "sample" else "-"
            print(f"{stage.index + 1}. {stage.name:<20} {stage.type:<8} {kind:<13}{extra:<34} {state}")
        print(f"run dir: {spec.run_dir}")
        return 0
    run_pipeline(spec, args.until)
    return 0
