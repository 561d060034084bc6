"""`megatron-r1 convert` / tools/convert_checkpoint.py: HF <-> Megatron checkpoint conversion."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megatron_r1.checkpoint.convert.convert import convert_hf_to_mcore, convert_mcore_to_hf
from megatron_r1.checkpoint.convert.gguf import hf_dir_from_gguf
from megatron_r1.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1 convert", description=__doc__)
    p.add_argument("--source", choices=("hf", "mcore", "gguf"), required=True,
                   help="format of --load (gguf: a llama.cpp file, read by transformers, dequantized to fp32)")
    p.add_argument("--target", choices=("hf", "mcore"), required=True, help="format of --save")
    p.add_argument("--load", required=True, help="input directory")
    p.add_argument("--save", required=True, help="output directory (written atomically)")
    p.add_argument("--model", choices=("deepseek_v3", "qwen2", "llama"),
                   help="expected architecture (checked against the input's config)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks that write the Megatron checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks that write the Megatron checkpoint")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks that write the Megatron checkpoint")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF safetensors shard (mcore -> hf)")
    p.add_argument("--force", action="store_true", help="replace --save if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.source == "gguf":
        return _from_gguf(args)
    if args.source == args.target:
        raise UserError(f"--source and --target are both {args.source}; to change a Megatron layout, load the "
                        f"checkpoint at the new layout (tools/reshard_checkpoint.py)")
    if args.target == "mcore":
        convert_hf_to_mcore(args.load, args.save, args.model, args.tp, args.pp, args.ep, args.force,
                            progress=not args.no_progress)
    else:
        if (args.tp, args.pp, args.ep) != (1, 1, 1):
            raise UserError("--tp/--pp/--ep apply to a Megatron target; HF output is always one full model")
        convert_mcore_to_hf(args.load, args.save, args.model, args.max_shard_size, args.force,
                            progress=not args.no_progress)
    return 0


def _from_gguf(args) -> int:
    """GGUF -> HF directory, or -> Megatron through a temporary HF directory."""
    if args.target == "hf":
        hf_dir_from_gguf(args.load, args.save, args.force, progress=not args.no_progress)
        return 0
    with tempfile.TemporaryDirectory(dir=Path(args.save).absolute().parent) as tmp:
        hf = hf_dir_from_gguf(args.load, Path(tmp) / "hf", progress=not args.no_progress)
        convert_hf_to_mcore(hf, args.save, args.model, args.tp, args.pp, args.ep, args.force,
                            progress=not args.no_progress)
    return 0
