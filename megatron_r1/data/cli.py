"""`megatron-r1 data ...` subcommands; the main CLI dispatches here."""
from __future__ import annotations

import argparse
import json

from megatron_r1.data.preview import preview
from megatron_r1.errors import ConfigError


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _option_value(text: str):
    # Task options arrive as strings; JSON gives numbers, booleans and lists their types ("3", "true", "[1,2]").
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-r1 data", description="Inspect datasets before training.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preview", help="print a few formatted samples and counts")
    p.add_argument("source", help="a .jsonl/.parquet file, a HF datasets directory, or builtin:<task>")
    p.add_argument("--template", default="r1_zero", help="r1_zero, r1_chat, plain (default r1_zero)")
    p.add_argument("--n", type=int, default=3, help="samples to show (default 3)")
    p.add_argument("--split", default="train", help="train or test (default train)")
    p.add_argument("--field", type=_key_value, action="append", default=[], metavar="FIELD=COLUMN",
                   help="map a sample field to a column, e.g. --field prompt=question (repeatable)")
    p.add_argument("--option", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="built-in task option, e.g. --option num_samples=100 --option difficulty=2 (repeatable)")
    p.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing")
    p.add_argument("--tokenizer", default=None, help="also count prompt tokens, e.g. builtin:demo")
    return parser


def data_cli(argv: list[str]) -> int:
    """Run `megatron-r1 data <argv>`; returns the exit code. UserErrors propagate to the main CLI's handler."""
    args = build_parser().parse_args(argv)
    if args.command == "preview":
        options = {k: _option_value(v) for k, v in args.option}
        if options and not args.source.startswith("builtin:"):
            raise ConfigError("--option applies to builtin: sources only")
        print(preview(args.source, args.template, args.n, dict(args.field) or None, args.split, args.skip_bad_rows,
                      args.tokenizer, **options))
    return 0
