"""Config: YAML + key=value overrides, presets, and errors that name the field."""
import pytest

from megatron_r1.config import Config, config_from_dict, load_config, parse_override, validate_world_size
from megatron_r1.errors import ConfigError


def test_defaults_follow_r1_zero():
    cfg = Config()
    assert cfg.rl.kl_coef == 0.001 and cfg.rl.kl_estimator == "k3"
    assert cfg.rl.clip_low == 0.2 and cfg.rl.clip_high == 0.2
    assert cfg.generation.temperature == 1.0
    assert cfg.data.template == "r1_zero"


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage: grpo\nmodel:\n  preset: deepseek_v3_tiny\n  hidden_size: 128\nrl:\n  group_size: 4\n")
    cfg = load_config(p, ["rl.clip_high=0.28", "model.num_layers=2", "rewards=[{name: format, weight: 2}]"])
    assert cfg.stage == "grpo"
    assert cfg.model.hidden_size == 128  # given next to the preset: overrides it
    assert cfg.model.kv_lora_rank == 64  # from the preset
    assert cfg.model.num_layers == 2
    assert cfg.rl.clip_high == 0.28 and cfg.rl.group_size == 4
    assert cfg.rewards[0].name == "format" and cfg.rewards[0].weight == 2.0


def test_preset_by_override_only():
    cfg = load_config(None, ["model.preset=deepseek_v3"])
    assert cfg.model.hidden_size == 7168 and cfg.model.num_experts == 256 and cfg.model.mtp_num_layers == 1


@pytest.mark.parametrize("overrides,needle", [
    (["parallel.tensor_model_parallel_size=3"],
     "tensor_model_parallel_size: 3 does not divide model.num_attention_heads (4)"),
    (["model.hidden_size=abc"], "model.hidden_size: expected an integer"),
    (["model.hidden_sise=12"], "model.hidden_sise: unknown field"),
    (["parallel.expert_model_parallel_size=3"], "expert_model_parallel_size: 3 does not divide model.num_experts"),
    (["parallel.pipeline_model_parallel_size=3"], "pipeline_model_parallel_size: 3 does not divide model.num_layers"),
    (["rl.group_size=1"], "rl.group_size"),
    (["model.preset=gpt5"], "model.preset: unknown preset 'gpt5'"),
    (["stage=dpo"], "stage: unknown stage 'dpo'"),
    (["noequals"], "expected section.key=value"),
])
def test_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.preset=deepseek_v3_tiny", *overrides])
    assert needle in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  hidden_size: 1\n  bad: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:" in str(e.value) and "invalid YAML" in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent/x.yaml")


def test_world_size_checks():
    cfg = config_from_dict({"parallel": {"tensor_model_parallel_size": 2}})
    validate_world_size(cfg.parallel, 4)
    with pytest.raises(ConfigError, match="world size 3 is not divisible"):
        validate_world_size(cfg.parallel, 3)


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a.b=true") == (["a", "b"], True)


def test_exponent_floats_without_a_dot():
    cfg = load_config(None, ["optimizer.lr=3e-3"])
    assert cfg.optimizer.lr == 3e-3


def test_uneven_pipeline_split_deepseek_v3():
    # DeepSeek-V3's 61 layers over 16 stages: one on the first stage, four on each of the others.
    cfg = load_config(None, ["model.preset=deepseek_v3", "parallel.pipeline_model_parallel_size=16",
                             "parallel.num_layers_in_first_pipeline_stage=1"])
    counts = cfg.parallel.pipeline_stage_layers(cfg.model.num_layers)
    assert counts == [1] + [4] * 15 and sum(counts) == 61
    with pytest.raises(ConfigError, match="do not split evenly"):
        load_config(None, ["model.preset=deepseek_v3", "parallel.pipeline_model_parallel_size=16",
                           "parallel.num_layers_in_first_pipeline_stage=2"])
    with pytest.raises(ConfigError, match="num_layers_in_first_pipeline_stage"):
        load_config(None, ["model.preset=deepseek_v3", "parallel.pipeline_model_parallel_size=16"])
