"""The generator reads every spec right, or refuses it: Transformer Engine's fused-norm layout (through the CPU
stand-in spec, `model.transformer_impl=te_standin`) gives the local spec's tokens and log-probs; every module and
config field the functional forward does not reproduce raises a ConfigError naming it."""

import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.inference import Engine, SamplingParams, weights
from megatron_r1.inference.functional import FunctionalGPT
from megatron_r1.inference.layer_adapter import canonical_name, read_model

from .conftest import SPEC_PRESETS as PRESETS
from .conftest import make_model


def _kind(mod):
    return type(mod).__name__


@pytest.mark.parametrize("preset", PRESETS)
def test_standin_has_transformer_engines_layout(pairs, preset):
    """The stand-in is Megatron's TE spec: norms fused into linear_qkv / linear_fc1 / MLA's up projections as
    `layer_norm_weight`, their own slots IdentityOp; MLA's input norm and MoE layers' pre-MLP norm stay modules."""
    _, te = pairs[preset]
    mla = te.config.multi_latent_attention
    for layer in te.decoder.layers:
        attn, moe = layer.self_attention, hasattr(layer.mlp, "router")
        if mla:
            assert _kind(layer.input_layernorm) == "RMSNorm"
            assert _kind(attn.q_layernorm) == _kind(attn.kv_layernorm) == "IdentityOp"
            assert attn.linear_q_up_proj.layer_norm_weight.shape == (te.config.q_lora_rank,)
            assert attn.linear_kv_up_proj.layer_norm_weight.shape == (te.config.kv_lora_rank,)
            assert _kind(attn.linear_q_down_proj) == _kind(attn.linear_kv_down_proj) == "Linear"
        else:
            assert _kind(layer.input_layernorm) == "IdentityOp"
            assert attn.linear_qkv.layer_norm_weight.shape == (te.config.hidden_size,)
        if moe:
            assert _kind(layer.pre_mlp_layernorm) == "RMSNorm"
            assert not hasattr(layer.mlp.shared_experts.linear_fc1, "layer_norm_weight")
        else:
            assert _kind(layer.pre_mlp_layernorm) == "IdentityOp"
            assert hasattr(layer.mlp.linear_fc1, "layer_norm_weight")
    where = [n.where for n in read_model(te).norms()]
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in where or mla
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in where


@pytest.mark.parametrize("preset", PRESETS)
def test_names_map_to_the_local_spec(pairs, preset):
    """Every TE-layout parameter has a local-spec counterpart of the same shape (refit and checkpoints move
    weights by these names)."""
    local, te = pairs[preset]
    loc = dict(local.named_parameters())
    mapped = {canonical_name(n): p for n, p in te.named_parameters()}
    assert mapped.keys() == loc.keys()
    assert all(mapped[n].shape == loc[n].shape for n in loc)
    assert any(n != canonical_name(n) for n, _ in te.named_parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_standin_forward_and_functional_equal_the_local_spec(pairs, preset):
    local, te = pairs[preset]
    tokens = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(5))
    pos = torch.arange(20).expand(3, 20)
    with torch.no_grad():
        ref = local(tokens, pos, None)
        out = te(tokens, pos, None)
    assert (out - ref).abs().max().item() < 1e-6  # the stand-in's fused norm is the local norm's arithmetic
    fn = FunctionalGPT(te, max_seq=64).prefill(tokens, torch.full((3,), 20), all_logits=True)
    assert (fn - out).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset,fused", [("llama_tiny", True), ("llama_tiny", False), ("qwen2_tiny", True),
                                          ("deepseek_v3_tiny", False)])
def test_engine_tokens_and_logprobs_equal_the_local_spec(pairs, preset, fused):
    """Greedy and sampled generation (same seeds) from the TE layout and the local one: same tokens, same
    log-probs. Dense models run the fused CPU decode step (its weights come through the adapter) or the torch
    ops; MLA + MoE the torch ops."""
    local, te = pairs[preset]
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 11, 3)]
    runs = []
    for model in (local, te):
        engine = Engine(model, max_batch_size=4, max_seq_len=64, seed=3)
        engine.fn.use_fused = fused
        if fused:
            assert engine.fn.fused_decode_step() is not None
        greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
        sampled = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=8, seed=5))
        runs.append(greedy + sampled)
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_refit_across_layouts(pairs):
    """A TE-layout trainer refits a local-layout engine through the full state dict (names canonicalised)."""
    local, te = pairs["llama_tiny"]
    engine = Engine(make_model("llama_tiny", seed=12), max_batch_size=2, max_seq_len=32)
    prompt = [[1, 2, 3, 4]]
    sp = SamplingParams(temperature=0, max_tokens=6)
    engine.refit(weights.full_state_dict(te))
    expect = Engine(local, max_batch_size=2, max_seq_len=32).generate(prompt, sp)[0]
    got = engine.generate(prompt, sp)[0]
    assert got.token_ids == expect.token_ids
    assert got.logprobs == pytest.approx(expect.logprobs, abs=1e-5)


# ------------------------------------------------------------------------------------------------- refusals
# Config refusals are driven by the parity table itself: tests/inference/test_parity_contract.py.


def test_unsupported_modules_are_refused_by_path(pairs, monkeypatch):
    local, te = pairs["llama_tiny"]
    layer = local.decoder.layers[1]
    monkeypatch.setattr(layer, "input_layernorm", torch.nn.LayerNorm(local.config.hidden_size))
    with pytest.raises(ConfigError, match=r"decoder\.layers\.1\.input_layernorm: LayerNorm"):
        FunctionalGPT(local, max_seq=16)
    monkeypatch.undo()

    qkv = te.decoder.layers[0].self_attention.linear_qkv
    monkeypatch.setattr(qkv, "normalization", "LayerNorm")
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.self_attention\.linear_qkv: fused LayerNorm"):
        FunctionalGPT(te, max_seq=16)
    monkeypatch.undo()

    # a norm module and a fused norm in front of the same block: not a layout either spec builds
    monkeypatch.setattr(te.decoder.layers[0], "input_layernorm", local.decoder.layers[0].input_layernorm)
    with pytest.raises(ConfigError, match="both a norm module and a fused norm"):
        FunctionalGPT(te, max_seq=16)
    monkeypatch.undo()

    proj = local.decoder.layers[0].self_attention.linear_proj
    monkeypatch.setattr(proj, "bias", torch.nn.Parameter(torch.zeros(local.config.hidden_size)))
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.self_attention\.linear_proj: a bias"):
        FunctionalGPT(local, max_seq=16)
    monkeypatch.undo()

    ds, _ = pairs["deepseek_v3_tiny"]
    grouped = type("GroupedMLP", (torch.nn.Module,), {})  # Megatron's grouped-GEMM experts: other weight names
    monkeypatch.setattr(ds.decoder.layers[1].mlp, "experts", grouped())
    with pytest.raises(ConfigError, match=r"decoder\.layers\.1\.mlp\.experts: GroupedMLP"):
        FunctionalGPT(ds, max_seq=16)
