"""The pipeline file (stages, references, overrides, fingerprints), command sections, mixture and routed reward —
everything that needs no model."""
import pytest
import yaml

from megatron_r1.errors import ConfigError
from megatron_r1.pipeline.mixture import RoutedReward, build_mixture, parse_mixture
from megatron_r1.pipeline.rejection_sampling import SamplingOptions
from megatron_r1.pipeline.sections import load_with_section
from megatron_r1.pipeline.stages import load_pipeline, parse_pipeline

from tests.pipeline.test_pipeline_e2e import TINY


def spec(stages, defaults=None, overrides=(), run_dir="/tmp/p"):
    return parse_pipeline({"run_dir": run_dir, "defaults": defaults or {}, "stages": stages}, "p.yaml",
                          list(overrides))


def test_references_paths_and_hand_over():
    s = spec([
        {"name": "a", "config": {"stage": "pretrain"}},
        {"name": "b", "type": "sample", "init_from": "a", "sampling": {"n": 2}},
        {"name": "c", "init_from": "a", "config": {"stage": "sft", "data": {"source": "${b.data}"}}},
    ], defaults={"model": {"preset": "deepseek_v3_tiny"}, "training": {"seed": 3}})
    a, b, c = s.stages
    assert a.config["checkpoint"] == {"save": "/tmp/p/a/checkpoints"}
    assert a.config["logging"]["run_dir"] == "/tmp/p/a" and a.config["training"]["seed"] == 3
    assert b.config["checkpoint"]["load"] == "/tmp/p/a/checkpoints" and "save" not in b.config["checkpoint"]
    assert b.sampling == {"n": 2, "output": "/tmp/p/b/samples.jsonl"}
    assert c.config["data"]["source"] == "/tmp/p/b/samples.jsonl"
    assert c.config["checkpoint"] == {"save": "/tmp/p/c/checkpoints", "load": "/tmp/p/a/checkpoints",
                                      "finetune": True, "load_optimizer": False}


def test_a_stage_model_replaces_the_defaults_model():
    s = spec([{"name": "student", "config": {"stage": "sft", "model": {"preset": "qwen2_tiny"}}}],
             defaults={"model": {"preset": "deepseek_v3_tiny", "q_lora_rank": 32}, "data": {"template": "plain"}})
    assert s.stages[0].config["model"] == {"preset": "qwen2_tiny"}
    assert s.stages[0].config["data"] == {"template": "plain"}  # other sections still merge


@pytest.mark.parametrize("stages,message", [
    ([{"name": "a", "config": {"data": {"source": "${zzz.data}"}}}], "refers to no earlier stage"),
    ([{"name": "a"}, {"name": "b", "config": {"data": {"source": "${a.data}"}}}], "produces no data file"),
    ([{"name": "a"}, {"name": "b", "config": {"data": {"source": "${a.weights}"}}}], "unknown product 'weights'"),
    ([{"name": "a", "init_from": "b"}, {"name": "b"}], "stage a.init_from: 'b' is not an earlier stage"),
    ([{"name": "a"}, {"name": "a"}], "used twice"),
    ([{"name": "a", "type": "eval"}], "unknown type 'eval'"),
    ([{"name": "a", "sampling": {"n": 2}}], "only a stage of type sample"),
    ([{"name": "a", "confg": {}}], "unknown key(s) confg"),
    ([{"name": "a b"}], "a name of letters"),
])
def test_mistakes_name_the_stage_and_field(stages, message):
    with pytest.raises(ConfigError, match=None) as e:
        spec(stages)
    assert message in str(e.value) and "p.yaml" in str(e.value)


def test_overrides_reach_a_stage_its_section_or_the_defaults():
    s = spec([{"name": "a", "config": {"stage": "sft"}}, {"name": "b", "type": "sample"}],
             overrides=["a.training.train_steps=7", "b.sampling.n=9", "optimizer.lr=0.5", "run_dir=/tmp/q"])
    a, b = s.stages
    assert a.config["training"]["train_steps"] == 7 and a.config["optimizer"]["lr"] == 0.5
    assert b.sampling["n"] == 9 and b.config["optimizer"]["lr"] == 0.5
    assert str(s.run_dir) == "/tmp/q" and a.config["logging"]["run_dir"] == "/tmp/q/a"


def test_fingerprint_follows_the_resolved_config():
    base = [{"name": "a", "config": {"stage": "sft"}}]
    f1 = spec(base).stages[0].fingerprint()
    assert spec(base).stages[0].fingerprint() == f1
    assert spec(base, overrides=["a.training.seed=2"]).stages[0].fingerprint() != f1


def test_example_pipelines_resolve_and_validate():
    from megatron_r1.pipeline.stages import build_config

    for path in (TINY, TINY.with_name("r1.yaml")):
        p = load_pipeline(path)
        assert "cold_start" in [s.name for s in p.stages] and p.stages[-1].type == "distill"
        for s in p.stages:
            build_config(s)  # every stage's Config validates
        rs_sft = next(s for s in p.stages if s.name == "rs_sft")
        # The report's default: stage-3 SFT starts from the base (a stage in the tiny file, a checkpoint in r1.yaml).
        assert rs_sft.init_from == "base" or rs_sft.config["checkpoint"]["load"].endswith("deepseek_v3_base")
        assert rs_sft.config["training"]["num_epochs"] == 2


def test_sampling_section_beside_the_config(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"stage": "sft", "data": {"source": "builtin:demo_arithmetic"},
                                 "sampling": {"n": 3, "min_language_consistency": 0.8}}))
    cfg, opts = load_with_section(f, ["sampling.n=5", "training.seed=9"], "sampling", SamplingOptions)
    assert isinstance(opts, SamplingOptions) and opts.n == 5 and opts.min_language_consistency == 0.8
    assert cfg.training.seed == 9 and cfg.data.source == "builtin:demo_arithmetic"
    f.write_text(yaml.safe_dump({"sampling": {"nn": 3}}))
    with pytest.raises(ConfigError, match=r"s.yaml: sampling.nn: unknown field"):
        load_with_section(f, [], "sampling", SamplingOptions)
    f.write_text(yaml.safe_dump({"sampling": {"n": "many"}}))
    with pytest.raises(ConfigError, match=r"sampling.n: expected an integer"):
        load_with_section(f, [], "sampling", SamplingOptions)


def test_mixture_counts_kinds_and_languages():
    opts, sources = parse_mixture({"num_samples": 20, "seed": 1, "sources": [
        {"source": "builtin:demo_arithmetic", "kind": "reasoning", "weight": 3, "language": "en"},
        {"source": "builtin:preferences", "kind": "general", "weight": 1}]})
    rows = build_mixture(opts, sources)
    assert [r["kind"] for r in rows].count("reasoning") == 15 and len(rows) == 20
    assert all(r["language"] == "en" for r in rows if r["kind"] == "reasoning")
    # Preference rows carry their own kind (helpful/harmless): kept as subkind, the route wins.
    assert {r["subkind"] for r in rows if r["kind"] == "general"} <= {"helpful", "harmless"}
    assert build_mixture(opts, sources) == rows  # seeded
    with pytest.raises(ConfigError, match=r"mixture.sources\[0\].kind: required"):
        parse_mixture({"sources": [{"source": "builtin:demo_arithmetic"}]})


def test_routed_reward_scores_each_kind_with_its_rewards():
    reward = RoutedReward({"reasoning": [{"name": "format", "weight": 2.0}],
                           "general": [{"name": "tests.rl.plugin_rewards:digit_share"}]})
    texts = ["<think> a </think> <answer> 1 </answer>", "12ab", "no tags"]
    samples = [{"kind": "reasoning"}, {"kind": "general"}, {"kind": "reasoning"}]
    assert reward(texts, samples) == [2.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="kind='other'"):
        reward(texts[:1], [{"kind": "other"}])
    with pytest.raises(ConfigError, match="default route"):
        RoutedReward({"a": [{"name": "format"}]}, default="b")
    # As configured in a stage: through CombinedReward by its dotted name, failures counted, not raised.
    from megatron_r1.rewards import CombinedReward, RewardSpec

    combined = CombinedReward([RewardSpec("megatron_r1.pipeline.mixture:RoutedReward", 1.0,
                                          {"routes": {"reasoning": [{"name": "format"}]}})])
    result = combined(texts[:1] + ["x"], [{"kind": "reasoning"}, {"kind": "unknown"}])
    assert result.total == [1.0, 0.0] and result.errors == 1
