"""The fused CPU decode step (csrc/cpu_decode.cpp) against the torch decode path and Megatron's full forward."""
import dataclasses
import warnings

import pytest
import torch

from megatron_r1.inference import Engine, SamplingParams, cpu_kernels
from megatron_r1.inference.functional import FunctionalGPT

from .conftest import make_model


@pytest.fixture(scope="module")
def ext():
    if not cpu_kernels.available():
        pytest.fail(f"fused CPU decode did not build: {cpu_kernels.build_error()}")
    return cpu_kernels.load()


def _shaped_model(hidden, heads, groups, qkv_bias=False, seed=3):
    """A 2-layer dense model of another head layout (head_dim = hidden / heads), all weights random."""
    from megatron_r1.config import ParallelConfig
    from megatron_r1.models import build_model, get_preset

    cfg = dataclasses.replace(get_preset("qwen2_tiny" if qkv_bias else "llama_tiny"), hidden_size=hidden,
                              num_attention_heads=heads, num_query_groups=groups, ffn_hidden_size=2 * hidden)
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelConfig(), "fp32").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if name.endswith("layernorm.weight") else p.normal_(0.0, 0.08)
    return model


def _run(fn, tokens, lengths, steps, batch_rows):
    """Prefill ragged prompts, then `steps` decode steps; returns every step's logits and the final cache."""
    cache = fn.new_cache(batch_rows)
    out = [fn.prefill(tokens[:, :int(lengths.max())], lengths, cache)]
    pos = lengths.clone()
    for _ in range(steps):
        out.append(fn.decode(tokens[torch.arange(tokens.shape[0]), pos].contiguous(), pos.clone(), cache))
        pos += 1
    return torch.stack(out), cache


LAYOUTS = {  # (hidden, heads, query groups): head_dim 32 / 64 / 128 use the unrolled kernels, 24 and 40 the generic
    "hd32_gqa2": (128, 4, 2), "hd64_mha": (128, 2, 2), "hd128_gqa2": (256, 2, 1), "hd24_gqa4": (96, 4, 1),
    "hd40_mha": (120, 3, 3),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_decode_equals_torch_path(parallel_tp1, ext, layout):
    hidden, heads, groups = LAYOUTS[layout]
    model = _shaped_model(hidden, heads, groups, qkv_bias=layout == "hd24_gqa4")
    fused, plain = FunctionalGPT(model, max_seq=64), FunctionalGPT(model, max_seq=64, use_fused=False)
    assert fused.fused_decode_reason() is None
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 512, (5, 48), generator=g)
    lengths = torch.tensor([3, 17, 9, 1, 12])  # ragged: rows attend over different lengths (masked by the bias)
    a, ca = _run(fused, tokens, lengths, 20, 6)
    b, cb = _run(plain, tokens, lengths, 20, 6)
    assert fused._fused is not None and plain._fused is None
    worst = (a - b).abs().max().item()
    assert worst < 2e-5, f"{layout}: max |logit diff| fused vs torch {worst:.2e}"
    for ka, kb in zip(ca.kv, cb.kv):  # the same K/V were cached (K roped), at the same positions
        assert (ka - kb).abs().max().item() < 2e-5
    assert torch.equal(ca.bias, cb.bias)


def test_fused_decode_equals_megatron_forward(models, ext):
    """Against Megatron-Core's own GPTModel forward (an independent reference), through the engine's cache."""
    model = models["qwen2_tiny"]  # QKV bias
    fn = FunctionalGPT(model, max_seq=64)
    tokens = torch.randint(0, 512, (3, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(tokens, torch.arange(30).expand(3, 30), None)
    logits, _ = _run(fn, tokens, torch.tensor([4, 11, 7]), 18, 3)
    assert fn._fused is not None
    worst = 0.0
    for step in range(1, 19):
        for b, start in enumerate((4, 11, 7)):
            p = start + step - 1
            if p < 30:
                worst = max(worst, (logits[step, b] - ref[b, p]).abs().max().item())
    assert worst < 1e-5, f"max |logit diff| vs GPTModel {worst:.2e}"


def test_threads_split_rows_same_result(models, ext):
    """Blocks of rows on two threads (one parallel region per step) give the single-thread logits."""
    fn = FunctionalGPT(models["llama_tiny"], max_seq=64)
    tokens = torch.randint(0, 512, (24, 40), generator=torch.Generator().manual_seed(6))
    lengths = torch.randint(1, 20, (24,), generator=torch.Generator().manual_seed(7))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, _ = _run(fn, tokens, lengths, 8, 24)
        torch.set_num_threads(2)
        two, _ = _run(fn, tokens, lengths, 8, 24)
    finally:
        torch.set_num_threads(saved)
    assert (one - two).abs().max().item() < 1e-5


def test_engine_greedy_same_with_and_without_fused(models, ext, monkeypatch):
    model = models["llama_tiny"]
    prompts = torch.randint(0, 512, (6, 9), generator=torch.Generator().manual_seed(8)).tolist()
    prompts[2] = prompts[2][:3]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    fused = Engine(model, max_batch_size=4, max_seq_len=32).generate(prompts, sp)  # 6 requests, 4 rows: rows move
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    engine = Engine(model, max_batch_size=4, max_seq_len=32)
    plain = engine.generate(prompts, sp)
    assert engine.fn._fused is None
    for f, p in zip(fused, plain):
        assert f.token_ids == p.token_ids
        assert max(abs(x - y) for x, y in zip(f.logprobs, p.logprobs)) < 1e-5


def test_refit_is_seen_by_the_fused_step(models, ext):
    """In-place weight updates (an optimizer step) and replaced Parameters (refit -> refresh) both reach it."""
    model = make_model("llama_tiny", seed=11)
    engine = Engine(model, max_batch_size=2, max_seq_len=32)
    prompt = [[5, 9, 13, 2]]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    before = engine.generate(prompt, sp)[0]
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight.mul_(-3.0)
    engine.refit()
    after = engine.generate(prompt, sp)[0]
    ref = Engine(model, max_batch_size=2, max_seq_len=32)
    ref.fn.use_fused = False
    expect = ref.generate(prompt, sp)[0]
    assert after.token_ids == expect.token_ids and after.logprobs != before.logprobs
    layer = model.decoder.layers[0].self_attention.linear_proj
    layer.weight = torch.nn.Parameter(layer.weight.detach() * 0.5)
    engine.refit()
    ref.refit()
    assert engine.generate(prompt, sp)[0].logprobs == pytest.approx(ref.generate(prompt, sp)[0].logprobs, abs=1e-5)


def test_not_applicable_models_use_the_torch_path(models):
    fn = FunctionalGPT(models["deepseek_v3_tiny"], max_seq=32)
    assert fn.fused_decode_reason() == "multi-latent attention"
    assert fn.fused_decode_step() is None


def test_failed_build_falls_back_with_a_warning(models, monkeypatch):
    def broken(verbose=False):
        raise RuntimeError("Error building extension 'megatron_r1_cpu_decode': g++ not found")

    monkeypatch.setattr(cpu_kernels, "_module", None)
    monkeypatch.setattr(cpu_kernels, "_build_error", None)
    monkeypatch.setattr(cpu_kernels, "load", broken)
    fn = FunctionalGPT(models["llama_tiny"], max_seq=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = _run(fn, torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), torch.tensor([3]), 4, 1)
    assert fn._fused is None and torch.isfinite(out).all()
    assert any("fused CPU decode unavailable" in str(w.message) for w in caught)
    assert isinstance(cpu_kernels.build_error(), RuntimeError)


def test_bad_inputs_raise_clear_errors(models, ext):
    fn = FunctionalGPT(models["llama_tiny"], max_seq=16)
    cache = fn.new_cache(2)
    fn.prefill(torch.tensor([[1, 2, 3]]), torch.tensor([3]), cache)
    with pytest.raises(RuntimeError, match="token id 9999 outside the vocabulary"):
        fn.decode(torch.tensor([9999]), torch.tensor([3]), cache)
    with pytest.raises(RuntimeError, match="position 16 outside the cache of 16"):
        fn.decode(torch.tensor([1]), torch.tensor([16]), cache)
    with pytest.raises(RuntimeError, match="batch 3 vs 2 cache rows"):
        fn.decode(torch.tensor([1, 2, 3]), torch.tensor([3, 3, 3]), cache)


def _run_paged(fn, tokens, lengths, steps, block_size=4, shared=False):
    """`_run` on a paged cache: blocks allocated as positions arrive (the engine's bookkeeping), copy-on-write of
    a shared block before a row writes into it; with `shared`, rows 1.. reference row 0's prompt blocks."""
    B = tokens.shape[0]
    cache = fn.new_paged_cache(B + 1, block_size=block_size, num_blocks=64)
    if shared:  # one prefill of row 0, its blocks shared by every row (GRPO's G answers of one prompt)
        cache.allocate_row(0, int(lengths[0]))
        out0 = fn.prefill(tokens[:1, :int(lengths[0])], lengths[:1], cache)
        cache.copy_rows(torch.zeros(B - 1, dtype=torch.long), torch.arange(1, B), int(lengths[0]))
        out = [out0.expand(B, -1)]
    else:
        for r in range(B):
            cache.allocate_row(r, int(lengths[r]))
        out = [fn.prefill(tokens[:, :int(lengths.max())], lengths, cache)]
    pos = lengths.clone()
    for _ in range(steps):
        for r in range(B):
            if cache.needs_block(r, int(pos[r])):
                cache.prepare_write(r, int(pos[r]))
        out.append(fn.decode(tokens[torch.arange(B), pos].contiguous(), pos.clone(), cache))
        pos += 1
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["hd32_gqa2", "hd64_mha", "hd24_gqa4"])
@pytest.mark.parametrize("shared", [False, True])
def test_fused_decode_on_a_paged_cache_equals_torch_path(parallel_tp1, ext, layout, shared):
    """The fused step walks the paged cache's block table (no gather): the same logits as the torch ops on the same
    paged cache, with blocks crossed mid-run, ragged rows and (shared) copy-on-write of a shared prompt block."""
    hidden, heads, groups = LAYOUTS[layout]
    model = _shaped_model(hidden, heads, groups, qkv_bias=layout == "hd24_gqa4")
    fused, plain = FunctionalGPT(model, max_seq=64), FunctionalGPT(model, max_seq=64, use_fused=False)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 512, (4, 48), generator=g)
    lengths = torch.tensor([6, 6, 6, 6]) if shared else torch.tensor([3, 17, 9, 1])
    if shared:
        tokens[1:, :6] = tokens[0, :6]
    a = _run_paged(fused, tokens, lengths, 15, shared=shared)
    b = _run_paged(plain, tokens, lengths, 15, shared=shared)
    assert fused._fused is not None
    worst = (a - b).abs().max().item()
    assert worst < 2e-5, f"{layout}: max |logit diff| fused paged vs torch paged {worst:.2e}"
    contiguous, _ = _run(plain, tokens, lengths, 15, 4)
    if not shared:
        assert (a - contiguous).abs().max().item() < 2e-5  # and the contiguous cache's


def test_engine_paged_greedy_same_with_and_without_fused(models, ext, monkeypatch):
    prompts = [[5, 17, 300, 42, 9], [100, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [5, 17, 300, 42, 9]]
    params = SamplingParams(temperature=0, max_tokens=12)
    with_fused = Engine(models["llama_tiny"], max_batch_size=3, max_seq_len=32, kv_cache="paged", kv_block_size=4,
                        kv_cache_blocks=12)
    assert with_fused.fn.fused_decode_step() is not None
    got = [(r.token_ids, r.logprobs) for r in with_fused.generate(prompts, params)]
    assert with_fused.stats["preemptions"] > 0  # a small pool: preemption and re-prefill on the fused path too
    monkeypatch.setenv("MEGATRON_R1_CPU_DECODE", "0")
    plain = Engine(models["llama_tiny"], max_batch_size=3, max_seq_len=32, kv_cache="paged", kv_block_size=4,
                   kv_cache_blocks=12)
    assert plain.fn.fused_decode_step() is None
    want = [(r.token_ids, r.logprobs) for r in plain.generate(prompts, params)]
    for (t1, l1), (t2, l2) in zip(got, want):
        assert t1 == t2 and max(abs(x - y) for x, y in zip(l1, l2)) < 1e-4
