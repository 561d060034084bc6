#!/usr/bin/env python
"""Rewrite a Megatron checkpoint at another TP/PP/EP layout.

    python tools/reshard_checkpoint.py --load DIR --save NEW_DIR --tp 2 [--pp N] [--ep N] [--force]

Not needed to *load* at another layout: `checkpoint.load=DIR` with any parallel settings reshards at load time
(dist_checkpointing stores global tensors). This writes the files as the new layout's ranks would.
"""
import argparse
import sys


def main(argv=None) -> int:
    from megatron_r1.checkpoint.convert.convert import reshard_mcore
    from megatron_r1.errors import UserError

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        reshard_mcore(args.load, args.save, args.tp, args.pp, args.ep, args.force)
    except UserError as e:
        print(f"reshard_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
