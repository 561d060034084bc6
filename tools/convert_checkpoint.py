#!/usr/bin/env python
"""HF <-> Megatron checkpoint conversion; the same as `megatron-r1 convert ...`.

    python tools/convert_checkpoint.py --source hf --target mcore --load HF_DIR --save MCORE_DIR [--tp N ...]
    python tools/convert_checkpoint.py --source mcore --target hf --load MCORE_DIR --save HF_DIR
"""
import sys

if __name__ == "__main__":  # dist_checkpointing's writer processes re-import the main module
    from megatron_r1.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
