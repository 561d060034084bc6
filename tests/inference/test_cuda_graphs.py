"""Bucketed static-shape decode (cuda_graphs.py): the same outputs as the eager step on the CPU, and a CUDA-graph
replay equal to the eager step on a GPU (`gpu`-marked)."""
import copy

import pytest
import torch

from megatron_r1.inference import Engine, SamplingParams
from megatron_r1.inference.cuda_graphs import StaticDecoder, batch_buckets, bucket_for, length_buckets
from megatron_r1.inference.functional import FunctionalGPT

from .conftest import make_model
from .test_engine import _prompts

PRESETS = ["deepseek_v3_tiny", "llama_tiny", "qwen2_tiny"]


def test_buckets(parallel_tp1):
    assert batch_buckets(256) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]
    assert batch_buckets(5) == [1, 2, 4, 5] and batch_buckets(1) == [1]
    assert length_buckets(4096) == [64, 128, 256, 512, 1024, 2048, 4096] and length_buckets(40) == [40]
    assert [bucket_for(n, batch_buckets(256)) for n in (1, 3, 17, 64, 65, 200)] == [1, 4, 24, 64, 96, 256]
    with pytest.raises(ValueError, match="exceeds"):
        bucket_for(257, batch_buckets(256))
    with pytest.raises(ValueError, match="CUDA"):
        fn = FunctionalGPT(make_model("llama_tiny"), max_seq=32)
        StaticDecoder(fn, fn.new_cache(2), capture=True)


def _prefilled(fn, n, T, seed):
    """A cache of 8 rows whose rows 0..n-1 hold prompts of different lengths <= T; returns cache, tokens, pos."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (n,), generator=g).to(fn.embed_w.device)
    tokens = torch.randint(0, 512, (n, T), generator=g).to(fn.embed_w.device)
    cache = fn.new_cache(8)
    logits = fn.prefill(tokens, lengths, cache)
    return cache, logits.argmax(-1), lengths


@pytest.mark.parametrize("preset", PRESETS)
def test_bucketed_steps_equal_unbucketed(models, preset):
    """Three decode steps of 3 rows, padded to the 4-row bucket and attending over a 16-position bucket, give
    the eager step's logits (the unpadded batch, L = max(pos) + 1) and leave the same cache rows."""
    fn = FunctionalGPT(models[preset], max_seq=48, use_fused=False)
    cache, tok, pos = _prefilled(fn, 3, 9, seed=len(preset))
    ref_cache = copy.deepcopy(cache)
    static = StaticDecoder(fn, cache, capture=False, lengths=[16, 48])
    assert static.batch_sizes == [1, 2, 4, 8]
    ref_tok = tok.clone()
    for _ in range(3):
        got = static(tok, pos, int(pos.max()) + 1)
        want = fn.decode(ref_tok, pos, ref_cache)
        assert got.shape == want.shape == (3, fn.vocab_size)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        tok, ref_tok, pos = got.argmax(-1), want.argmax(-1), pos + 1
    for a, b in zip(cache._tensors(), ref_cache._tensors()):  # row 3 (padding) differs: it wrote its position 0
        torch.testing.assert_close(a[:3], b[:3], rtol=1e-5, atol=1e-5)
    assert torch.equal(cache.bias[:3], ref_cache.bias[:3])


def test_static_moe_equals_sorted_dispatch(models):
    """The sync-free MoE (every expert on every row, weighted) equals the eager split on many routings."""
    fn = FunctionalGPT(models["deepseek_v3_tiny"], max_seq=32)
    lyr = next(lyr for lyr in fn.layers if lyr.moe is not None)
    x = torch.randn(64, fn.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fn._ffn(lyr, x, static=True), fn._ffn(lyr, x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_engine_static_decode_equals_eager(models, preset):
    """Through the engine: 9 prompts in 5 slots, so the running batch shrinks and grows (buckets 1/2/4/5) and rows
    move; greedy and seeded-sampling outputs equal the eager engine's."""
    model = models[preset]
    prompts = _prompts(9, seed=3)
    for params in (SamplingParams(temperature=0, max_tokens=7),
                   [SamplingParams(temperature=1.0, max_tokens=3 + i % 5, seed=i) for i in range(9)]):
        eager = Engine(model, max_batch_size=5, max_seq_len=40, static_decode=False).generate(prompts, params)
        engine = Engine(model, max_batch_size=5, max_seq_len=40, static_decode=True)
        assert engine.static_decoder is not None and not engine.static_decoder.capture
        static = engine.generate(prompts, params)
        for a, b in zip(static, eager):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-5, atol=1e-5)


def test_engine_decode_mode_defaults(models):
    """CPU: the eager step by default and with cuda_graphs=True (graphs need CUDA); the config field exists."""
    from megatron_r1.config import GenerationConfig

    assert GenerationConfig().cuda_graphs is True
    assert Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=16).static_decoder is None
    assert Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=16, cuda_graphs=True).static_decoder is None


def test_refit_drops_graphs_only_when_parameters_moved(parallel_tp1):
    fn = FunctionalGPT(make_model("llama_tiny"), max_seq=16)
    static = StaticDecoder(fn, fn.new_cache(2), capture=False)
    static.graphs[(1, 16)] = object()  # stands for a captured graph
    assert not static.invalidate_if_moved() and static.num_graphs == 1
    with torch.no_grad():  # in place (an optimizer step, a refit by copy): the graph still reads the right memory
        fn.model.decoder.layers[0].mlp.linear_fc1.weight.add_(1.0)
    assert not static.invalidate_if_moved() and static.num_graphs == 1
    w = fn.model.decoder.layers[0].mlp.linear_fc1.weight
    w.data = w.data.clone()  # new storage
    assert static.invalidate_if_moved() and static.num_graphs == 0


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_graph_replay_equals_eager(parallel_tp1, preset):
    """bf16 on CUDA: each replayed step (captured for buckets 4 x 16, then 4 x 48 as rows grow) equals the same
    bucketed step run eagerly on a copy of the cache, and the engine with graphs generates the eager engine's
    greedy tokens."""
    model = make_model(preset).cuda().to(torch.bfloat16)
    fn = FunctionalGPT(model, max_seq=48)
    cache, tok, pos = _prefilled(fn, 3, 9, seed=1)
    ref_cache = copy.deepcopy(cache)
    graphs = StaticDecoder(fn, cache, capture=True, lengths=[16, 48])
    eager = StaticDecoder(fn, ref_cache, capture=False, lengths=[16, 48])
    for step in range(10):
        max_len = int(pos.max()) + 1
        got, want = graphs(tok, pos, max_len).clone(), eager(tok, pos, max_len)
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0, msg=f"step {step}")
        tok, pos = want.argmax(-1), pos + 1
    assert graphs.num_graphs == 2
    prompts = _prompts(9, seed=3)
    params = SamplingParams(temperature=0, max_tokens=12)
    ref = Engine(model, max_batch_size=5, max_seq_len=40, cuda_graphs=False).generate(prompts, params)
    engine = Engine(model, max_batch_size=5, max_seq_len=40, cuda_graphs=True)
    assert engine.static_decoder is not None and engine.static_decoder.capture
    out = engine.generate(prompts, params)
    # bf16 eager (unpadded, L = max(pos) + 1) and the padded graph may round differently: compare most tokens
    same = sum(a.token_ids == b.token_ids for a, b in zip(out, ref))
    assert same >= 7, f"{same}/9 greedy continuations equal"
