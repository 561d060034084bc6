"""Shared fixtures: one process-wide parallel state (TP=1) and small models with non-trivial weights."""
import pytest
import torch


@pytest.fixture(scope="session")
def parallel_tp1():
    from megatron_r1.config import ParallelConfig
    from megatron_r1.parallel import init_parallel

    return init_parallel(ParallelConfig())


def make_model(preset: str, seed: int = 0, std: float = 0.05, **overrides):
    """A TP=1 fp32 model whose every weight (norms, biases, expert bias too) is random, so no term is trivially
    zero or one and a wrong formula shows up in the logits. `overrides`: ModelConfig fields set on the preset."""
    from megatron_r1.config import ParallelConfig
    from megatron_r1.models import build_model, get_preset

    torch.manual_seed(seed)
    cfg = get_preset(preset)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    model = build_model(cfg, ParallelConfig(), "fp32").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, std)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.1)
    return model


def saved_models(tmp_path, seed: int, reference) -> tuple[dict, dict]:
    """For the sharded-model tests: the MoE and the dense preset built at TP=1 with `seed`; returns
    ({preset: reference(model)}, {preset: file of its full state dict}) for `sharded_models` to load."""
    from megatron_r1.inference import weights

    refs, files = {}, {}
    for preset in ("deepseek_v3_tiny", "llama_tiny"):
        model = make_model(preset, seed=seed)
        refs[preset] = reference(model)
        files[preset] = str(tmp_path / f"{preset}.pt")
        torch.save(weights.full_state_dict(model), files[preset])
    return refs, files


def sharded_models(state_files: dict):
    """Inside a spawned rank: each saved model (`{preset: path of its full state dict}`) rebuilt at TP=2 and, for
    the MoE preset, at EP=2, with the full weights loaded into this rank's shard. Yields (preset, layout, model,
    full state dict)."""
    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import weights
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

    layouts = {"tp2": ParallelConfig(tensor_model_parallel_size=2),
               "ep2": ParallelConfig(expert_model_parallel_size=2)}
    for preset, path in state_files.items():
        full = torch.load(path)
        for name, layout in layouts.items():
            if name == "ep2" and preset != "deepseek_v3_tiny":
                continue
            init_parallel(layout)
            model = build_model(get_preset(preset), layout, "fp32").eval()
            weights.load_full_state_dict(model, full)
            yield preset, name, model, full


@pytest.fixture(scope="session")
def models(parallel_tp1):
    return {name: make_model(name) for name in ("deepseek_v3_tiny", "llama_tiny", "qwen2_tiny")}


SPEC_PRESETS = ["llama_tiny", "qwen2_tiny", "deepseek_v3_tiny"]


def _standin(preset, local):
    """A te_standin model holding `local`'s weights (moved by name through weights.full_state_dict)."""
    import dataclasses

    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import weights
    from megatron_r1.models import build_model, get_preset

    cfg = dataclasses.replace(get_preset(preset), transformer_impl="te_standin")
    model = build_model(cfg, ParallelConfig(), "fp32").eval()
    weights.load_full_state_dict(model, weights.full_state_dict(local))
    return model


@pytest.fixture(scope="module")
def pairs(parallel_tp1):
    """{preset: (local-spec model, TE-layout stand-in with the same weights)} for every model family."""
    out = {}
    for preset in SPEC_PRESETS:
        local = make_model(preset, seed=11)
        out[preset] = (local, _standin(preset, local))
    return out
