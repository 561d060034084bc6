"""The functional forward reproduces Megatron's GPTModel: full-sequence logits, and cached prefill + decode."""
import dataclasses

import pytest
import torch

from megatron_r1.inference.functional import FunctionalGPT

PRESETS = ["deepseek_v3_tiny", "llama_tiny", "qwen2_tiny"]


def _megatron_logits(model, tokens):
    B, T = tokens.shape
    with torch.no_grad():
        return model(tokens, torch.arange(T).expand(B, T), None)


@pytest.mark.parametrize("preset", PRESETS)
def test_full_sequence_logits_equal_gptmodel(models, preset):
    model = models[preset]
    tokens = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(1))
    ref = _megatron_logits(model, tokens)
    out = FunctionalGPT(model, max_seq=64).prefill(tokens, torch.full((3,), 24), all_logits=True)
    assert out.shape == ref.shape
    diff = (out - ref).abs().max().item()
    assert diff < 1e-5, f"{preset}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("preset,absorb", [("deepseek_v3_tiny", True), ("deepseek_v3_tiny", False),
                                           ("llama_tiny", True), ("qwen2_tiny", True)])
def test_cached_prefill_and_decode_equal_full_forward(models, preset, absorb):
    """Ragged prompts prefilled together (right padding), then per-row decode positions, against the full pass."""
    model = models[preset]
    fn = FunctionalGPT(model, max_seq=64, mla_absorb=absorb)
    tokens = torch.randint(0, 512, (3, 24), generator=torch.Generator().manual_seed(2))
    ref = _megatron_logits(model, tokens)
    cache = fn.new_cache(4)
    lengths = torch.tensor([12, 5, 17])
    worst = 0.0
    logits = fn.prefill(tokens[:, :17], lengths, cache, row0=0)
    for b in range(3):
        worst = max(worst, (logits[b] - ref[b, lengths[b] - 1]).abs().max().item())
    pos = lengths.clone()
    for _ in range(6):
        logits = fn.decode(tokens[torch.arange(3), pos], pos, cache)
        for b in range(3):
            worst = max(worst, (logits[b] - ref[b, pos[b]]).abs().max().item())
        pos += 1
    assert worst < 1e-5, f"{preset} absorb={absorb}: max |logit diff| {worst:.2e}"


def test_mla_cache_holds_the_compressed_latent(models):
    """DeepSeek-V3's saving: kv_lora_rank + rope dims per token and layer, not heads x (k + v) dims."""
    model = models["deepseek_v3_tiny"]
    cfg = model.config
    cache = FunctionalGPT(model, max_seq=32).new_cache(2)
    assert cache.k is None and len(cache.latent) == cfg.num_layers
    per_token = cache.bytes_per_token() // cfg.num_layers // 4
    assert per_token == cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim  # 64 + 16
    expanded = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim + cfg.v_head_dim)
    assert per_token * 3 < expanded


def test_hf_llama_logits_match(models):
    """The same weights in HF's LlamaForCausalLM / Qwen2ForCausalLM give the same logits (benchmark baseline)."""
    pytest.importorskip("transformers")
    from megatron_r1.inference.hf_llama import to_hf

    tokens = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(3))
    for preset in ("llama_tiny", "qwen2_tiny"):
        model = models[preset]
        with torch.no_grad():
            hf_logits = to_hf(model)(tokens).logits
        diff = (hf_logits - _megatron_logits(model, tokens)).abs().max().item()
        assert diff < 1e-5, f"{preset}: HF vs Megatron {diff:.2e}"


def test_a_pipeline_stage_decodes_with_torch_ops_not_the_fused_step(monkeypatch, models):
    """Pipeline-parallel generation (tests/inference/test_pipeline_parallel.py) runs a stage's layers only; the fused
    CPU step runs the whole model, so it does not apply there."""
    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 2)
    fn = FunctionalGPT(models["llama_tiny"])
    assert fn.fused_decode_reason() == "pipeline parallelism" and fn.fused_decode_step() is None


@pytest.mark.parametrize("preset", PRESETS)
def test_single_prompt_prefill(models, preset):
    """Batch of one (the server's usual prefill): layouts that are views for B > 1 may not be for B = 1."""
    model = models[preset]
    tokens = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(4))
    out = FunctionalGPT(model, max_seq=32).prefill(tokens, torch.tensor([9]), all_logits=True)
    assert (out - _megatron_logits(model, tokens)).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", PRESETS)
def test_one_token_prompt_then_decode(models, preset):
    """A one-token prompt (the server's shortest) prefills [1, 1] and decodes on from its cache."""
    model = models[preset]
    tokens = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(5))
    ref = _megatron_logits(model, tokens)[0]
    fn = FunctionalGPT(model, max_seq=16)
    cache = fn.new_cache(2)
    worst = (fn.prefill(tokens[:, :1], torch.tensor([1]), cache)[0] - ref[0]).abs().max().item()
    for t in range(1, 6):
        out = fn.decode(tokens[:, t], torch.tensor([t]), cache)[0]
        worst = max(worst, (out - ref[t]).abs().max().item())
    assert worst < 1e-5, f"{preset}: max |logit diff| {worst:.2e}"


def _variant(preset: str, seed: int = 0, **fields):
    """A TP=1 fp32 model of `preset` with ModelConfig `fields` changed, every weight random (as conftest's)."""
    from megatron_r1.config import ParallelConfig
    from megatron_r1.models import build_model, get_preset

    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(get_preset(preset), **fields), ParallelConfig(), "fp32").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("layernorm.weight") else p.normal_(0.0, 0.05)
        for name, b in model.named_buffers():
            if name.endswith("expert_bias"):
                b.normal_(0.0, 0.1)
    return model


def _cached_worst(model, tokens, steps=5, ref=None, **kw):
    """Max |logit diff| against Megatron's full forward (of `ref` when given) of: the full-sequence prefill, then
    a ragged prefill (each row `steps` + its row index tokens short) and `steps` decode steps."""
    B, T = tokens.shape
    ref = _megatron_logits(ref or model, tokens)
    fn = FunctionalGPT(model, max_seq=64, **kw)
    worst = (fn.prefill(tokens, torch.full((B,), T), all_logits=True) - ref).abs().max().item()
    cache = fn.new_cache(B)
    pos = T - steps - torch.arange(B)
    rows = torch.arange(B)
    logits = fn.prefill(tokens[:, :int(pos.max())], pos.clone(), cache)
    worst = max(worst, (logits - ref[rows, pos - 1]).abs().max().item())
    for _ in range(steps):
        out = fn.decode(tokens[rows, pos], pos, cache)
        worst = max(worst, (out - ref[rows, pos]).abs().max().item())
        pos += 1
    return worst


@pytest.mark.parametrize("absorb", [True, False])
def test_mla_with_plain_rope(parallel_tp1, absorb):
    """MLA with rope_type="rope" (no YaRN): its rotary module returns the frequencies alone, not (freqs, mscale)
    as YaRN's does, and used to crash the engine's construction."""
    model = _variant("deepseek_v3_tiny", rope_type="rope", num_layers=2)
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(6))
    worst = _cached_worst(model, tokens, mla_absorb=absorb)
    assert worst < 1e-5, f"max |logit diff| {worst:.2e}"


@pytest.mark.parametrize("pre_softmax", [False, True])
def test_softmax_router(parallel_tp1, pre_softmax):
    """The softmax router (Mixtral/Qwen-MoE style, no expert bias): softmax over the top-k logits, or over all
    experts before top-k (moe_router_pre_softmax), with group-limited routing and the routed scaling factor."""
    model = _variant("deepseek_v3_tiny", moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                     num_layers=2)
    model.config.moe_router_pre_softmax = pre_softmax  # read by Megatron's router at every forward
    assert model.decoder.layers[1].mlp.router.expert_bias is None
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(7))
    worst = _cached_worst(model, tokens)
    assert worst < 1e-5, f"max |logit diff| {worst:.2e}"


def test_mtp_layers_do_not_change_generation(parallel_tp1):
    """An MTP model generates from its main head: the functional forward equals Megatron's forward of the same
    weights without the MTP block (GPTModel itself needs labels once MTP is built)."""
    from megatron_r1.inference import weights

    mtp = _variant("deepseek_v3_tiny", mtp_num_layers=1, num_layers=2)
    assert any(n.startswith("mtp.") for n, _ in mtp.named_parameters())
    plain = _variant("deepseek_v3_tiny", num_layers=2, seed=1)
    weights.load_full_state_dict(plain, weights.full_state_dict(mtp))
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(8))
    worst = _cached_worst(mtp, tokens, ref=plain)
    assert worst < 1e-5, f"max |logit diff| {worst:.2e}"
