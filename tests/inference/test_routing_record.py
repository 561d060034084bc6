"""Engine(record_routing=True): every input token's top-k experts per MoE layer, equal to the routing Megatron's own
TopKRouter computes on the same sequences (read through its replay hook, in its [s, b] token order)."""
import pytest
import torch

from megatron_r1.errors import UserError
from megatron_r1.inference import Engine, SamplingParams

from .conftest import make_model


def _megatron_routing(model, seqs):
    """The trainer model's own top-k ids per MoE layer for right-padded `seqs`: [b, s, layers, k] (-1 padding)."""
    from megatron_r1.models.router_replay import install, routing_replay

    reps = install(model)
    b, s = len(seqs), max(len(x) for x in seqs)
    tokens = torch.zeros(b, s, dtype=torch.long)
    for i, x in enumerate(seqs):
        tokens[i, :len(x)] = torch.tensor(x)
    with torch.no_grad(), routing_replay([model], replay=False):
        model(tokens, torch.arange(s).expand(b, s), None)
        # Megatron flattens the router's [s, b] input s-major
        ids = torch.stack([r.get_recorded_indices().view(s, b, -1).transpose(0, 1) for r in reps], dim=2)
    return ids, [r.layer for r in reps]


@pytest.mark.parametrize("static", [False, True])
def test_recorded_routing_is_megatrons_routing(parallel_tp1, static):
    model = make_model("deepseek_v3_tiny", seed=3)
    engine = Engine(model, max_batch_size=3, max_seq_len=64, record_routing=True, static_decode=static)
    assert engine.routing_layers == [1, 2, 3]  # first_k_dense_replace=1 of 4 layers
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 9, 2, 12)]
    prompts.insert(1, list(prompts[0]))  # an identical prompt: prefilled once, its routing copied
    results = engine.generate(prompts, [SamplingParams(temperature=1.0, max_tokens=6, seed=i) for i in range(5)])
    inputs = [p + r.token_ids[:-1] for p, r in zip(prompts, results)]
    ref, layers = _megatron_routing(model, inputs)
    assert layers == engine.routing_layers
    for i, (x, r) in enumerate(zip(inputs, results)):
        assert r.routing is not None and r.routing.dtype == torch.int16
        assert r.routing.shape == (len(x), 3, 2)
        assert torch.equal(r.routing.long().sort(-1).values, ref[i, :len(x)].sort(-1).values), i


def test_record_routing_needs_moe_layers(parallel_tp1):
    with pytest.raises(UserError, match="no MoE layers"):
        Engine(make_model("llama_tiny"), max_batch_size=2, max_seq_len=32, record_routing=True)


def test_without_recording_results_carry_no_routing(models):
    (r,) = Engine(models["deepseek_v3_tiny"], max_batch_size=2, max_seq_len=32).generate(
        [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3))
    assert r.routing is None
