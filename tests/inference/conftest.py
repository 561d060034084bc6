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


@pytest.fixture(scope="session")
def models(parallel_tp1):
    return {name: make_model(name) for name in ("deepseek_v3_tiny", "llama_tiny", "qwen2_tiny")}
