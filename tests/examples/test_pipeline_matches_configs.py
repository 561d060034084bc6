"""examples/pipelines/r1.yaml says its stages use the same settings as examples/configs/deepseek_v3/*.yaml: check it.

Compared: what decides a stage's run (model, layout, optimizer, batch and precision, generation and RL settings,
rewards, template, tokenizer, checkpoint cadence). Not compared: where things are read and written (checkpoint
load/save, run dirs, data files), which the pipeline sets itself, and sections a stage type never reads (the
pipeline's shared `rl`/`generation` defaults reach its SFT stages too, harmlessly).
"""
import dataclasses
from pathlib import Path

import pytest

from megatron_r1.config import config_from_dict, read_yaml
from megatron_r1.pipeline.stages import load_pipeline

ROOT = Path(__file__).resolve().parents[2]
FILES = {"cold_start": "cold_start_sft", "reasoning_rl": "reasoning_rl", "rejection_sampling": "rejection_sampling",
         "rs_sft": "stage3_sft", "reward_model": "reward_model", "all_scenario_rl": "all_scenario_rl",
         "distill": "distill"}
ALWAYS = ("model", "parallel", "tokenizer", "data.template", "checkpoint.keep_last")
TRAINED = ("optimizer", "training", "checkpoint.save_interval")
BY_STAGE = {
    "cold_start": TRAINED, "rs_sft": TRAINED, "reward_model": TRAINED, "distill": TRAINED,
    "reasoning_rl": TRAINED + ("generation", "rl", "rewards"),
    # The pipeline routes rewards by prompt kind (a mixture); the standalone file has one flat list.
    "all_scenario_rl": TRAINED + ("generation", "rl"),
    # A sampling job: no optimizer step; its filters are the `sampling:` section, not rewards.
    "rejection_sampling": ("generation.temperature", "generation.top_p", "generation.max_new_tokens"),
}


def _pick(cfg, keys):
    d = dataclasses.asdict(cfg)
    out = {}
    for key in keys:
        value = d
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


@pytest.mark.parametrize("stage_name", list(FILES))
def test_pipeline_stage_matches_its_config_file(stage_name):
    pipeline = load_pipeline(ROOT / "examples/pipelines/r1.yaml")
    stage = pipeline.stage(stage_name)
    path = ROOT / f"examples/configs/deepseek_v3/{FILES[stage_name]}.yaml"
    raw = {k: v for k, v in read_yaml(path).items() if k not in ("sampling", "distill", "mixture")}
    ours = config_from_dict(stage.config, source=f"stage {stage_name}")
    theirs = config_from_dict(raw, source=str(path))
    keys = ALWAYS + BY_STAGE[stage_name]
    a, b = _pick(ours, keys), _pick(theirs, keys)
    diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
    assert diff == {}, f"r1.yaml stage {stage_name} vs {path.name}: (pipeline, file) {diff}"


def test_every_stage_has_a_file():
    assert {s.name for s in load_pipeline(ROOT / "examples/pipelines/r1.yaml").stages} == set(FILES)
