"""`megatron-r1 <command> ...`: a table of commands, each owned by the module that implements it.

Each command is `main(argv: list[str]) -> int` in its own module (no giant argparse here). Errors the user can fix
(`UserError`: bad config, data, layout, checkpoint) print one line naming the problem and exit 2.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

from megatron_r1 import __version__
from megatron_r1.errors import UserError

# Before torch loads its OpenMP runtime: idle OpenMP threads sleep instead of spinning. On a CPU shared with
# other work (the generator, reward workers, a second rank), spinning threads were measured to make a GRPO step
# several times slower; with the machine to itself the cost is nil.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

COMMANDS = {
    "demo": ("megatron_r1.rl.demo:main", "the embedded CPU demo: tiny DeepSeek-V3 base -> R1-Zero GRPO -> eval"),
    "train": ("megatron_r1.training.cli:main", "run a stage from a config: pretrain | sft | grpo | reward_model"),
    "eval": ("megatron_r1.rl.evaluate:main", "pass@1 over k samples, cons@k, length and format rate of a checkpoint"),
    "serve": ("megatron_r1.inference.cli:serve_main", "OpenAI-compatible HTTP server on the in-engine generator"),
    "data": ("megatron_r1.data.cli:data_cli", "inspect datasets: `data preview SOURCE`"),
    "plot": ("megatron_r1.logging.cli:main", "write PNG curves of a run directory"),
    "convert": ("megatron_r1.checkpoint.convert.cli:main", "HF <-> Megatron checkpoint conversion"),
    "plan": ("megatron_r1.planning.cli:main", "per-GPU memory plan of a layout; does it fit"),
    "pipeline": ("megatron_r1.pipeline.cli:main", "run the R1 stages in order, resumable"),
    "sample": ("megatron_r1.pipeline.rejection_sampling:main", "rejection sampling: n answers per prompt, filtered"),
    "distill": ("megatron_r1.pipeline.distill:main", "distil an R1 checkpoint into a dense student by SFT"),
}


def _usage() -> str:
    lines = ["usage: megatron-r1 <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _quiet_known_warnings() -> None:
    """Megatron-Core warns at import about optional GPU packages (TE, apex) whose fallbacks we test; users of the
    CLI should see their run, not those."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core")


def main(argv: list[str] | None = None) -> int:
    _quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"megatron-r1: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(argv[1:]) or 0)
    except UserError as e:
        print(f"megatron-r1 {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-r1 {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
