"""`megatron-r1 plan CONFIG [key=value ...] --nodes N ...`: per-GPU memory of a layout and whether it fits."""
from __future__ import annotations

import argparse
import json

from megatron_r1.config import load_config
from megatron_r1.planning.memory import DEFAULT_OVERHEAD_GB, format_plan, plan_memory


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megatron-r1 plan", description=__doc__)
    ap.add_argument("config", help="YAML config (its parallel section is the layout)")
    ap.add_argument("overrides", nargs="*",
                    help="section.key=value overrides, e.g. parallel.expert_model_parallel_size=64")
    ap.add_argument("--nodes", type=int, default=1, help="nodes in the allocation (default 1)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    ap.add_argument("--gpu-memory-gb", type=float, default=80.0, help="usable memory per GPU, GiB")
    ap.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=None,
                    help="plan with full activation recompute (default: training.recompute_activations)")
    ap.add_argument("--micro-batch-size", type=int, default=None, help="default: training.micro_batch_size")
    ap.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="tokens cached per GPU by the colocated engine (default: GRPO rollouts of a step / DP)")
    ap.add_argument("--overhead-gb", type=float, default=DEFAULT_OVERHEAD_GB,
                    help="fixed per-GPU overhead: CUDA context, communication buffers, fragmentation")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def main(argv: list[str]) -> int:
    args = build_parser().parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    plan = plan_memory(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gb=args.gpu_memory_gb,
                       recompute=args.recompute, micro_batch_size=args.micro_batch_size,
                       kv_cache_tokens=args.kv_cache_tokens, overhead_gb=args.overhead_gb, source=args.config)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else format_plan(plan))
    return 0
