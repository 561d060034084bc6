"""Training selects its layer spec with `model.transformer_impl`; Transformer Engine's layout (through the CPU
stand-in) trains exactly like the local spec from the same weights, also at TP = 2 with sequence parallelism
(the fused norm's weight is a replicated, sequence-parallel parameter)."""
from functools import partial

import pytest
import torch

from megatron_r1.config import config_from_dict
from megatron_r1.errors import ConfigError
from megatron_r1.parallel import cpu_compat
from tests.distributed import run_distributed
from tests.presets import tiny_deepseek_v3

TINY = tiny_deepseek_v3(seq_length=32, max_position_embeddings=64)


def _cfg(impl, tp=1, preset_fields=TINY):
    return config_from_dict({"model": {**preset_fields, "transformer_impl": impl},
                             "parallel": {"tensor_model_parallel_size": tp},
                             "training": {"micro_batch_size": 2, "global_batch_size": 2, "seed": 1},
                             "optimizer": {"lr": 1e-2, "lr_warmup_steps": 0}})


def test_transformer_impl_selects_and_explains():
    from megatron_r1.models.builder import resolve_transformer_impl

    assert resolve_transformer_impl(_cfg("te_standin").model) == "te_standin"
    assert resolve_transformer_impl(_cfg("local").model) == "local"
    if cpu_compat.te_available() and torch.cuda.is_available():
        pytest.skip("Transformer Engine is usable here: the missing-TE message cannot be shown")
    assert resolve_transformer_impl(_cfg("auto").model) == "local"
    with pytest.raises(ConfigError, match=r"transformer_impl=transformer_engine: .*pip install .*te_standin"):
        resolve_transformer_impl(_cfg("transformer_engine").model)
    with pytest.raises(ConfigError, match="model.transformer_impl: unknown implementation 'apex'"):
        _cfg("apex")


def _forward_step(batches, it, model):
    tokens = batches[next(it)]
    out = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None, labels=tokens)

    def loss_func(o):
        loss = o.float().mean()
        return loss, {"loss": loss.detach()}

    return out, loss_func


def _train_both(rank, world, steps):
    """Local and te_standin models from the same weights, `steps` optimizer steps on the same batches each:
    losses, and the largest weight difference afterwards (names canonicalised)."""
    from megatron_r1.inference import weights
    from megatron_r1.inference.layer_adapter import canonical_name
    from megatron_r1.parallel import init_parallel
    from megatron_r1.training import build_train_state, train_step

    ctx = init_parallel(_cfg("local", world).parallel, world)
    torch.manual_seed(0)
    states = {impl: build_train_state(_cfg(impl, world), ctx, steps) for impl in ("local", "te_standin")}
    local, te = (states[k].unwrapped[0] for k in ("local", "te_standin"))
    weights.load_full_state_dict(te, weights.full_state_dict(local))
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 384, (2, 32), generator=g) for _ in range(steps)]
    losses = {}
    for impl, state in states.items():
        step = partial(_forward_step, batches)
        losses[impl] = [train_step(state, step, iter([i]), 1, 32, 2).loss for i in range(steps)]
    a, b = weights.full_state_dict(local), weights.full_state_dict(te)
    fused = [n for n, _ in te.named_parameters() if n != canonical_name(n)]
    diff = max((a[n] - b[n]).abs().max().item() for n in a)
    return losses, diff, len(fused)


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
def test_standin_trains_like_the_local_spec(world):
    """Same losses step by step and the same weights after 3 Adam steps (TP = 2: sequence-parallel MLA + MoE)."""
    for losses, diff, n_fused in run_distributed(_train_both, world, 3):
        assert n_fused > 0
        assert losses["te_standin"] == pytest.approx(losses["local"], rel=1e-5, abs=1e-6), losses
        assert losses["local"][-1] != losses["local"][0]  # the steps did change the model
        assert diff < 1e-5, diff
