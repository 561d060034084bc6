"""The engine's contiguous KV cache is sized from the requests (issue #21): at a large context it does not
allocate [slots x context] up front, grows (reallocation + copy) when a longer request arrives or a row crosses a
position bucket, frees itself when idle, stays within `kv_cache_memory_gb` (preempting the newest requests), and
every token and log-prob equals the preallocated cache's (the behaviour before)."""
import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.inference import Engine, SamplingParams
from megatron_r1.inference.cuda_graphs import StaticDecoder

from .conftest import make_model

CONTEXT = 8192  # SmolLM2-135M's context: 32 preallocated rows of it were 12 GB there


@pytest.fixture(scope="module")
def long_models(parallel_tp1):
    return {p: make_model(p, max_position_embeddings=CONTEXT) for p in ("llama_tiny", "deepseek_v3_tiny")}


def _prompts(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _run(engine, schedule):
    """Submit `schedule` [(step to submit at, prompt, params)], step until all finish; (results by id, peak bytes
    the cache held per step)."""
    reqs, peak, step = {}, 0, 0
    while len(reqs) < len(schedule) or any(not r.done.is_set() for r in reqs.values()):
        for i, (at, prompt, params) in enumerate(schedule):
            if at == step:
                reqs[i] = engine.add_request(prompt, params)
        engine.step()
        peak = max(peak, engine.cache.nbytes())
        step += 1
    return {i: r.result for i, r in reqs.items()}, peak


def _schedule():
    """Short requests from step 0 (G=3 copies of one prompt among them: shared prefill), a long prompt arriving
    mid-run (grows the positions 64 -> 256 while others decode), a row crossing the 64-position bucket while
    decoding, and more requests than fit in 4 rows at first (grows the rows)."""
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    short = _prompts(5, 3, 20, seed=1)
    sched = [(0, p, greedy) for p in short]
    sched += [(0, short[0], SamplingParams(max_tokens=12, temperature=1.0, seed=10 + k)) for k in range(3)]
    sched.append((4, _prompts(1, 150, 151, seed=2)[0], SamplingParams(max_tokens=10, temperature=0.8, seed=3)))
    sched.append((2, _prompts(1, 58, 59, seed=4)[0], SamplingParams(max_tokens=16, temperature=0.0)))
    sched += [(6, p, SamplingParams(max_tokens=6, temperature=1.0, seed=20 + k))
              for k, p in enumerate(_prompts(6, 5, 30, seed=5))]
    return sched


def _preallocated(engine):
    """The cache as it was before #21: every slot row of the whole context, allocated at construction."""
    engine.cache = engine.fn.new_cache(engine.max_batch_size)
    if engine.static_decoder is not None:  # it decodes through the cache it was built on
        engine.static_decoder = StaticDecoder(engine.fn, engine.cache, capture=False)
    return engine


def _assert_same(got, ref):
    assert got.keys() == ref.keys()
    for i in ref:
        assert got[i].token_ids == ref[i].token_ids, f"request {i}"
        assert got[i].logprobs == ref[i].logprobs, f"request {i}"
        assert got[i].raw_logprobs == ref[i].raw_logprobs, f"request {i}"
        assert got[i].finish_reason == ref[i].finish_reason


@pytest.mark.parametrize("preset,kind,static", [("llama_tiny", "auto", False), ("llama_tiny", "contiguous", True),
                                                ("deepseek_v3_tiny", "contiguous", False)])
def test_default_cache_grows_with_requests_and_matches_preallocated(long_models, preset, kind, static):
    """llama_tiny with the defaults gets the contiguous cache (the fused CPU decode step) where the step is built;
    static: the bucketed CUDA-graph step run eagerly (it grows the cache to its bucket)."""
    model = long_models[preset]
    engine = Engine(model, max_batch_size=32, kv_cache=kind, static_decode=static or None)
    if kind == "auto" and engine.paged:
        pytest.skip("the fused CPU decode step is not built here: auto picks the paged cache")
    cache = engine.cache
    full = 32 * CONTEXT * cache.bytes_per_token()
    assert not cache.paged and engine.max_seq_len == CONTEXT
    assert cache.nbytes() == 0 and cache.rows_cap == 0  # nothing up front

    got, peak = _run(engine, _schedule())
    # at most 16 rows at once (14 requests) of at most 160 positions: 16 x 256 positions, 1/64 of the full cache
    assert 0 < peak <= 16 * 256 * cache.bytes_per_token() < full // 32
    assert cache.version >= 3  # grown more than once (rows, the long prompt, ...)
    assert engine.stats["kv_cache_bytes_peak"] == peak
    assert cache.nbytes() == 0  # idle: freed

    ref, ref_peak = _run(_preallocated(Engine(model, max_batch_size=32, kv_cache=kind,
                                              static_decode=static or None)), _schedule())
    assert ref_peak == full
    _assert_same(got, ref)


def test_budget_bounds_the_cache_and_preempts(long_models):
    """kv_cache_memory_gb: the cache never holds more; requests that do not fit wait or are preempted (recompute)
    and still produce the preallocated cache's tokens (greedy)."""
    model = long_models["llama_tiny"]
    probe = Engine(model, max_batch_size=8, kv_cache="contiguous")
    bpt = probe.cache.bytes_per_token()
    with pytest.raises(ConfigError, match="kv_cache_memory_gb"):  # less than one full-context request
        Engine(model, max_batch_size=8, kv_cache="contiguous", kv_cache_memory_gb=(CONTEXT - 1) * bpt / 2 ** 30)
    budget = CONTEXT * bpt  # one full-context row, or 4 rows of 2048, 32 of 256, ...
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    # 32 rows of 256 positions fit; rows crossing 256 do not: the newest are preempted
    sched = [(0, p, greedy) for p in _prompts(32, 200, 250, seed=7)]
    engine = Engine(model, max_batch_size=32, kv_cache="contiguous", kv_cache_memory_gb=budget / 2 ** 30)
    got, peak = _run(engine, sched)
    assert peak <= budget and engine.stats["kv_cache_bytes_peak"] <= budget
    assert engine.stats["preemptions"] > 0
    ref, _ = _run(_preallocated(Engine(model, max_batch_size=32, kv_cache="contiguous")), sched)
    for i in ref:
        assert got[i].token_ids == ref[i].token_ids, f"request {i}"
        torch.testing.assert_close(got[i].raw_logprobs, ref[i].raw_logprobs, rtol=0, atol=1e-5)
