"""PNG curves of a run's metrics (what people look at: reward, accuracy, response length, KL, loss)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from megatron_r1.logging.metrics import read_metrics

DEFAULT_GROUPS = {
    "reward": ("reward/", "reward"),
    "accuracy": ("accuracy", "format_rate", "eval/"),
    "response_length": ("response_length",),
    "loss": ("loss", "grad_norm", "kl", "entropy", "clip_frac"),
    "throughput": ("tokens_per_s", "time/"),
    "moe": ("moe/",),
}


def plot_run(run_dir: str | Path, out_dir: Optional[str | Path] = None,
             groups: Optional[dict[str, Iterable[str]]] = None) -> list[Path]:
    """Write one PNG per group of metrics (keys starting with or equal to the group's prefixes); return paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r if k not in ("step", "time")})
    written = []
    for name, prefixes in (groups or DEFAULT_GROUPS).items():
        chosen = [k for k in keys if any(k == p or k.startswith(p) for p in prefixes)]
        if not chosen:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in chosen[:12]:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
