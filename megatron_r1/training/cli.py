"""`megatron-r1 train CONFIG [section.key=value ...] [--dry-run]`: run the stage named by the config's `stage`."""
from __future__ import annotations

import argparse
import importlib
import os

from megatron_r1.config import load_config
from megatron_r1.planning import dry_run

STAGE_RUNNERS = {
    "pretrain": "megatron_r1.training.pretrain:run_pretrain",
    "sft": "megatron_r1.sft.trainer:run_sft",
    "grpo": "megatron_r1.rl.trainer:run_grpo",
    "reward_model": "megatron_r1.reward_model.trainer:run_reward_model",
}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 train", description=__doc__)
    ap.add_argument("config", help="YAML config file")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides (YAML values)")
    ap.add_argument("--dry-run", action="store_true", help="validate config and layout, print the plan, exit")
    args = ap.parse_intermixed_args(argv)  # `--dry-run` anywhere, before or among the overrides
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(dry_run(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
        return 0

    module_name, func_name = STAGE_RUNNERS[cfg.stage].split(":")
    getattr(importlib.import_module(module_name), func_name)(cfg)
    return 0
