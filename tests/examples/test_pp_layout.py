"""The 671B pipeline-parallel RL layout (examples/configs/deepseek_v3/r1_zero_rl_pp.yaml): uneven first/last stages as
DeepSeek-V3 used, valid for 64 nodes, the planner says it fits, and the figures its comment quotes are today's."""
import re
from pathlib import Path

import pytest

from megatron_r1.config import load_config
from megatron_r1.planning import plan_memory

CONFIG = Path(__file__).resolve().parents[2] / "examples/configs/deepseek_v3/r1_zero_rl_pp.yaml"


def test_pp_layout_has_uneven_stages_and_fits():
    cfg = load_config(CONFIG)
    p = cfg.parallel
    assert p.pipeline_model_parallel_size > 1
    middle = (cfg.model.num_layers - p.num_layers_in_first_pipeline_stage - p.num_layers_in_last_pipeline_stage)
    per_middle = middle / (p.pipeline_model_parallel_size - 2)
    assert p.num_layers_in_first_pipeline_stage < per_middle and p.num_layers_in_last_pipeline_stage < per_middle
    plan = plan_memory(cfg, nodes=64)
    assert plan.fits
    text = CONFIG.read_text()
    quoted = re.search(r"total ([\d.]+) GiB of 80", text)
    assert quoted and float(quoted.group(1)) == pytest.approx(plan.per_gpu_gb["total"], abs=0.01)
