"""`python -m megatron_r1.planning.dry_run_cli CONFIG --world-size N [key=value ...]`: what launch scripts call for
`--dry-run`. Validates config and layout on the CPU, prints the summary; exit 2 with one line naming the field if
the layout cannot run. Imports neither torch nor Megatron, so it is quick on a login node."""
from __future__ import annotations

import argparse
import sys

from megatron_r1.config import load_config
from megatron_r1.errors import UserError
from megatron_r1.planning.layout import dry_run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_r1.planning.dry_run_cli", description=__doc__)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides, as given to the stage command")
    ap.add_argument("--world-size", type=int, required=True, help="NNODES × GPUS_PER_NODE")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0)
    args = ap.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        print(dry_run(cfg, args.world_size, gpu_memory_gb=args.gpu_memory_gb, source=args.config))
    except UserError as e:
        print(f"dry run failed: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
