"""The pipeline's report: one markdown table of each stage's key metrics and one PNG of their curves.

Metrics come from what the stages left on disk (their metrics.jsonl and STAGE_DONE.json), so a report written
after a re-run that skipped everything is the same as the first one.
"""
from __future__ import annotations

import math
from pathlib import Path

from megatron_r1.pipeline.stages import read_marker

# Per trainer stage: the metrics worth a line in the report, in order (first and last logged value shown).
KEY_METRICS = {
    "pretrain": ["loss"],
    "sft": ["loss", "eval/loss", "epoch"],
    "grpo": ["reward", "accuracy", "format_rate", "reward/language_consistency", "response_length/mean", "kl"],
    "reward_model": ["loss", "pairwise_accuracy", "eval/pairwise_accuracy"],
}
# The curve drawn per stage in the PNG.
CURVE = {"pretrain": "loss", "sft": "loss", "grpo": "reward", "reward_model": "loss"}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]


def stage_lines(stage, marker: dict | None) -> list[str]:
    """Markdown lines for one stage: status, time, and its key metrics."""
    from megatron_r1.logging.metrics import read_metrics

    if marker is None:
        return [f"### {stage.index + 1}. {stage.name} ({stage.type})", "", "not finished", ""]
    summary = marker.get("summary", {})
    head = [f"### {stage.index + 1}. {stage.name} ({stage.type}"
            + (f", {summary.get('stage')}" if summary.get("stage") else "") + ")", "",
            f"finished {marker.get('finished')} in {marker.get('seconds')} s"
            + (f"; initialised from `{stage.init_from}`" if stage.init_from else ""), ""]
    lines = ["| metric | first | last |", "|---|---|---|"]
    if stage.type in ("train", "distill"):
        rows = read_metrics(stage.dir)
        kind = summary.get("stage") or "sft"
        keys = list(KEY_METRICS.get(kind, ["loss"]))
        if kind == "grpo":  # every reward component, whatever the config called it (accuracy/format: shown above)
            keys += sorted({k for r in rows for k in r if k.startswith("reward/") and k not in keys
                            and k not in ("reward/accuracy", "reward/format", "reward/std")})
        for key in keys:
            pts = _series(rows, key)
            if pts:
                lines.append(f"| {key} | {_fmt(pts[0][1])} | {_fmt(pts[-1][1])} |")
        if rows:
            lines.append(f"| steps | | {rows[-1]['step']} |")
        if summary.get("mixture"):
            lines.append(f"| prompt mixture | | {', '.join(f'{k}: {v}' for k, v in summary['mixture'].items())} |")
    if stage.type == "sample":
        lines += _sampling_lines(summary)
    if stage.type == "distill":
        data = summary.get("data", {})
        lines.append(f"| distillation rows | | {data.get('rows')} |")
        if data.get("teacher"):
            teacher = data["teacher"]
            lines.append(f"| teacher answers kept | | {teacher.get('kept')} of {teacher.get('drawn')} |")
        for key, value in (summary.get("eval") or {}).items():
            lines.append(f"| student eval {key} | | {_fmt(value)} |")
    return head + lines + [""]


def _sampling_lines(summary: dict) -> list[str]:
    lines = [f"| prompts | | {summary.get('prompts')} |", f"| answers drawn | | {summary.get('drawn')} |"]
    for name, n in (summary.get("removed") or {}).items():
        lines.append(f"| removed: {name} | | {n} |")
    lines.append(f"| kept (reasoning rows) | | {summary.get('reasoning_rows')} |")
    lines.append(f"| general rows mixed in | | {summary.get('general_rows')} |")
    return lines


def write_png(spec, stages, markers: dict, path: Path) -> Path:
    """One panel per stage: its main curve (trainers) or the filter bars (rejection sampling)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_r1.logging.metrics import read_metrics

    n = max(1, len(stages))
    cols = min(4, n)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3 * rows_n), squeeze=False)
    for ax, stage in zip(axes.flat, stages):
        marker = markers.get(stage.name) or {}
        summary = marker.get("summary", {})
        ax.set_title(f"{stage.index + 1}. {stage.name}", fontsize=9)
        if stage.type == "sample" and summary:
            removed = summary.get("removed", {})
            names = list(removed) + ["kept"]
            ax.barh(names, [removed[k] for k in removed] + [summary.get("kept", 0)], color="tab:gray")
            ax.tick_params(labelsize=7)
            ax.set_xlabel("answers")
            continue
        key = CURVE.get(summary.get("stage") or "sft", "loss")
        pts = _series(read_metrics(stage.dir), key)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
        else:
            ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_report(spec, stages) -> tuple[Path, Path]:
    """Write <run_dir>/report.md and report.png for `stages` (those this run covered)."""
    markers = {s.name: read_marker(s) for s in stages}
    md = spec.run_dir / "report.md"
    png = spec.run_dir / "report.png"
    total = sum((m or {}).get("seconds", 0) for m in markers.values())
    lines = ["# R1 pipeline report", "", f"pipeline: `{spec.source}`  ", f"run dir: `{spec.run_dir}`  ",
             f"stages finished: {sum(m is not None for m in markers.values())} of {len(spec.stages)}; "
             f"stage time {total:.0f} s", "", "![curves](report.png)", ""]
    for stage in stages:
        lines += stage_lines(stage, markers[stage.name])
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(lines) + "\n")
    write_png(spec, stages, markers, png)
    return md, png
