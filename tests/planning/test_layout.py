"""dry_run: a valid layout gives a summary; each broken rule fails with a message naming the field."""
import pytest

from megatron_r1.config import load_config
from megatron_r1.errors import ConfigError
from megatron_r1.planning import dry_run
from megatron_r1.planning.dry_run_cli import main as dry_run_main

TINY = ["model.preset=deepseek_v3_tiny", "training.micro_batch_size=2", "training.global_batch_size=16"]


def test_valid_layout_summary():
    out = dry_run(load_config(None, TINY + ["parallel.expert_model_parallel_size=2"]), 4, source="tiny")
    assert "tiny is valid for world size 4" in out
    assert "EP 2" in out and "fits" in out


@pytest.mark.parametrize("overrides, world, field", [
    (["parallel.tensor_model_parallel_size=3"], 3, "parallel.tensor_model_parallel_size"),
    (["parallel.pipeline_model_parallel_size=3"], 3, "parallel.pipeline_model_parallel_size"),
    (["parallel.expert_model_parallel_size=3"], 3, "parallel.expert_model_parallel_size"),
    (["parallel.tensor_model_parallel_size=2"], 3, "parallel: world size 3"),
    (["parallel.expert_model_parallel_size=4"], 2, "parallel.expert_model_parallel_size"),
    (["training.global_batch_size=12"], 4, "training.global_batch_size"),
    (["parallel.num_microbatches=3"], 2, "parallel.num_microbatches"),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=false"], 2, "parallel.sequence_parallel"),
    (["stage=grpo", "rl.prompts_per_step=3", "rl.group_size=3", "rl.mini_batch_size=9"], 2, "rl.prompts_per_step"),
    (["stage=grpo", "model.seq_length=64"], 1, "model.seq_length"),
])
def test_broken_layouts_name_the_field(overrides, world, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        dry_run(load_config(None, TINY + overrides), world)


def test_dry_run_cli(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: {preset: deepseek_v3_tiny}\ntraining: {micro_batch_size: 2, global_batch_size: 16}\n")
    assert dry_run_main([str(path), "--world-size", "2"]) == 0
    assert "valid for world size 2" in capsys.readouterr().out
    assert dry_run_main([str(path), "--world-size", "3", "parallel.tensor_model_parallel_size=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dry run failed: ") and "parallel.tensor_model_parallel_size: 3" in err
