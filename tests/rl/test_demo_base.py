"""The demo's shipped base model: in the package, small, with its provenance; it loads into the demo's model,
matches its recorded shapes and evaluates to its recorded held-out figures."""
import dataclasses

import pytest
import torch

from megatron_r1.errors import CheckpointError
from megatron_r1.rl import demo
from megatron_r1.rl.demo_base import (LOSS_CURVE, PROVENANCE, SHIPPED, WEIGHTS, load_base, read_provenance,
                                      shapes_of, weights_of, write_base)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    return demo.stage_configs(tmp_path_factory.mktemp("demo"), [], quick=False)


def test_shipped_base_is_small_and_says_how_it_was_made(configs):
    pre_cfg, _ = configs
    for name in (WEIGHTS, PROVENANCE, LOSS_CURVE):
        assert (SHIPPED / name).is_file(), name
    assert (SHIPPED / WEIGHTS).stat().st_size < 20e6
    p = read_provenance(SHIPPED)
    assert p["command"].startswith("megatron-r1 demo --pretrain")
    # What made it is what `--pretrain` runs today: the demo's own pre-training config.
    recorded = {k: p[k] for k in ("model", "training", "optimizer", "data", "tokenizer")}
    current = {k: dataclasses.asdict(getattr(pre_cfg, k)) for k in recorded}
    for section in ("model", "optimizer", "tokenizer"):
        assert recorded[section] == current[section], section
    for key in ("train_steps", "global_batch_size", "micro_batch_size", "seed"):
        assert recorded["training"][key] == current["training"][key], key
    assert recorded["data"]["source"] == current["data"]["source"]
    assert recorded["data"]["options"] == current["data"]["options"]
    curve = p["loss_curve"]
    assert curve[-1][0] == p["training"]["train_steps"] and curve[-1][1] < curve[0][1] / 3
    assert p["tokenizer_vocab_sha256"] == demo.vocab_digest(pre_cfg)
    held = p["held_out"]
    assert held["k"] == 8 and held["problems"] == 64 and 0.0 < held["pass@1"] < 1.0


@pytest.mark.slow  # evaluates the shipped weights
def test_shipped_base_loads_matches_its_shape_and_recorded_figures(configs):
    pre_cfg, rl_cfg = configs
    p = read_provenance(SHIPPED)
    model = demo.build_demo_model(rl_cfg)
    assert load_base(model, SHIPPED) == p
    assert shapes_of(weights_of(model)) == p["shapes"]
    assert sum(t.numel() for t in model.parameters()) == p["num_parameters"]
    got, want = demo.check_figures(model, pre_cfg, rl_cfg), p["check"]
    assert got["held_out_loss"] == pytest.approx(want["held_out_loss"], abs=2e-3)
    # Sampling with the recorded seeds: identical on the same build; a few flipped tokens elsewhere at most.
    assert got["pass@1"] == pytest.approx(want["pass@1"], abs=0.1)
    assert got["mean_length"] == pytest.approx(want["mean_length"], abs=3.0)


def test_write_then_load_round_trips_and_a_mismatch_is_refused(configs, tmp_path):
    _, rl_cfg = configs
    model = demo.build_demo_model(rl_cfg)
    write_base(model, tmp_path / "base", {"command": "test"})
    expected = {k: v.to(torch.float16).float() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert load_base(model, tmp_path / "base")["command"] == "test"
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, expected[k]), k
    other = dataclasses.replace(rl_cfg, model=dataclasses.replace(rl_cfg.model, ffn_hidden_size=64))
    with pytest.raises(CheckpointError, match="does not match this model"):
        load_base(demo.build_demo_model(other), tmp_path / "base")
    with pytest.raises(CheckpointError, match="not a demo base"):
        load_base(model, tmp_path)
