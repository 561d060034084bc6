"""Layout planning without GPUs: exact parameter counts, per-GPU memory, and dry-run validation of a layout."""
from megatron_r1.planning.layout import dry_run, validate_layout
from megatron_r1.planning.memory import Plan, format_plan, plan_memory
from megatron_r1.planning.params import ParamCount, count_params

__all__ = ["dry_run", "validate_layout", "Plan", "format_plan", "plan_memory", "ParamCount", "count_params"]
