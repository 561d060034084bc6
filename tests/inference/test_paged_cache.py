"""The paged KV cache (inference/paged_cache.py): the same tokens and log-probs as contiguous rows, every block
returned, prompt blocks shared by a GRPO group, and a pool too small for the batch completing every request by
preemption with the unconstrained run's outputs."""
import logging

import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.inference import Engine, SamplingParams
from megatron_r1.inference.functional import FunctionalGPT
from megatron_r1.inference.paged_cache import PagedKVCache, blocks_for_memory, bytes_per_token
from tests.distributed import run_distributed

from .conftest import saved_models, sharded_models
from .test_engine import _prompts

PRESETS = ["deepseek_v3_tiny", "llama_tiny", "qwen2_tiny"]  # MLA + MoE, dense GQA, dense with QKV bias


def _sampling(n, max_tokens=9):
    """Greedy for even requests, seeded sampling for odd ones, different lengths: rows finish at different steps."""
    return [SamplingParams(temperature=0, max_tokens=max_tokens - i % 4) if i % 2 == 0 else
            SamplingParams(temperature=1.0, seed=50 + i, max_tokens=max_tokens - i % 3) for i in range(n)]


def _assert_same(got, want, tol=0.0):
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        worst = max(abs(a - b) for a, b in zip(g.logprobs, w.logprobs))
        assert worst <= tol, worst


def _assert_all_free(engine):
    cache = engine.cache
    assert cache.pool.num_used == 0 and cache.num_free == cache.num_blocks - 1
    assert all(r == 0 for r in cache.pool.refs) and not any(cache.rows)
    cache.sync()
    assert int(cache.block_table.abs().sum()) == 0  # free rows point at the scratch block


@pytest.mark.parametrize("preset", PRESETS)
def test_functional_paged_decode_equals_contiguous(models, preset):
    """Prefill and 10 decode steps through 4-token blocks give bitwise the contiguous cache's logits (entries are
    the same, masked positions add exactly 0), eager and with the static (bucketed) step."""
    fn = FunctionalGPT(models[preset], max_seq=48, use_fused=False)
    g = torch.Generator().manual_seed(len(preset))
    lengths, tokens = torch.tensor([5, 9, 3]), torch.randint(0, 512, (3, 9), generator=g)
    flat = fn.new_cache(4)
    paged, static = (fn.new_paged_cache(4, block_size=4, num_blocks=30) for _ in range(2))
    for cache in (paged, static):
        for row, n in enumerate(lengths.tolist()):
            cache.allocate_row(row, n)
    want = fn.prefill(tokens, lengths, flat)
    assert torch.equal(fn.prefill(tokens, lengths, paged), want)
    assert torch.equal(fn.prefill(tokens, lengths, static), want)
    tok, pos = want.argmax(-1), lengths.clone()
    for _ in range(10):
        for cache in (paged, static):
            for row in range(3):
                if cache.needs_block(row, int(pos[row])):
                    cache.prepare_write(row, int(pos[row]))
        want = fn.decode(tok, pos, flat)
        assert torch.equal(fn.decode(tok, pos, paged), want)
        static.sync()
        got = fn.decode(tok, pos, static, max_len=32)  # the static step: fixed L, a table slice of 8 blocks
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # another L: another summation order
        tok, pos = want.argmax(-1), pos + 1
    assert [len(paged.rows[r]) for r in range(3)] == [4, 5, 4]  # ceil((length + 10) / 4) blocks each


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("static", [False, True])
def test_engine_paged_equals_contiguous(models, preset, static):
    """9 requests through 4 slots (rows join, leave and move), greedy and seeded sampling: paged (3-token blocks)
    gives the contiguous engine's tokens and log-probs, and every block is back in the pool afterwards."""
    model = models[preset]
    prompts = _prompts(9, seed=7)
    params = _sampling(9)
    kw = dict(max_batch_size=4, max_seq_len=40, static_decode=static)
    flat = Engine(model, kv_cache="contiguous", **kw)
    want = flat.generate(prompts, params)
    engine = Engine(model, kv_cache="paged", kv_block_size=3, **kw)
    # bitwise where both run the same torch ops; the fused CPU step (contiguous dense fp32) rounds differently
    fused = flat.fn.fused_decode_step() is not None and not static
    _assert_same(engine.generate(prompts, params), want, tol=1e-5 if static or fused else 0.0)
    assert engine.stats["preemptions"] == 0 and engine.stats["kv_blocks_peak"] > 0
    _assert_all_free(engine)


def test_auto_picks_contiguous_only_for_the_fused_cpu_step(models):
    mla = Engine(models["deepseek_v3_tiny"], max_batch_size=2, max_seq_len=32)
    assert mla.paged and isinstance(mla.cache, PagedKVCache)
    dense = Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=32)
    assert dense.paged == (dense.fn.fused_decode_step() is None)
    with pytest.raises(Exception, match="kv_cache"):
        Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=32, kv_cache="rows")


def test_blocks_returned_on_abort_and_refit(models):
    """Aborted, finished and refit-interrupted requests give back every block (and shared ones exactly once)."""
    model = models["deepseek_v3_tiny"]
    engine = Engine(model, max_batch_size=4, max_seq_len=40, kv_block_size=4)
    prompts = _prompts(3, seed=9)
    reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12)) for p in prompts + [prompts[0]] * 2]
    engine.step()
    engine.step()
    assert engine.cache.pool.num_used > 0
    engine.abort(reqs[1])
    engine.abort(reqs[3])  # a copy sharing prompt 0's blocks
    engine.step()
    assert reqs[1].result.finish_reason == reqs[3].result.finish_reason == "abort"
    engine.refit()  # running requests go back to the queue: their blocks are freed at once
    _assert_all_free(engine)
    while engine.has_work():
        engine.step()
    assert all(r.result.finish_reason in ("length", "abort") for r in reqs)
    _assert_all_free(engine)


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "llama_tiny"])
def test_group_shares_prompt_blocks(models, preset):
    """G = 8 answers of one 30-token prompt in 8-token blocks: the prompt's 4 blocks are held once (ref count 8),
    each answer copies only the partial last block on its first write; tokens equal the contiguous engine's."""
    model = models[preset]
    prompt = _prompts(1, seed=11, lo=30, hi=31)[0]
    G, new = 8, 6
    params = [SamplingParams(temperature=1.0, seed=200 + i, max_tokens=new) for i in range(G)]
    kw = dict(max_batch_size=G, max_seq_len=64)
    want = Engine(model, kv_cache="contiguous", **kw).generate([prompt] * G, params)
    engine = Engine(model, kv_cache="paged", kv_block_size=8, **kw)
    reqs = [engine.add_request(prompt, sp) for sp in params]
    engine.step()  # prefill once, G rows referencing the same 4 blocks, then one decode step
    assert engine.stats["prefill_tokens_shared"] == (G - 1) * 30
    shared = engine.cache.rows[0][:3]
    assert all(engine.cache.rows[r][:3] == shared for r in range(G))
    assert all(engine.cache.pool.refs[b] == G for b in shared)
    # the decode wrote position 30 into block 3: G - 1 rows copied it, the last writer kept the original
    assert engine.cache.pool.num_used == 3 + G and len({engine.cache.rows[r][3] for r in range(G)}) == G
    while engine.has_work():
        engine.step()
    _assert_same([r.result for r in reqs], want, tol=1e-5)  # dense contiguous: the fused CPU step's rounding
    # positions 0..34 are cached (the last token is never fed back): 3 full shared blocks, then per answer its own
    # block 24..31 and one for 32..34: 3 + 2G = 19; unshared it would be G * 5 = 40
    assert engine.stats["kv_blocks_peak"] == 3 + 2 * G
    assert engine.stats["kv_blocks_peak"] < G * engine.cache.blocks_for(30 + new)
    _assert_all_free(engine)


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_pool_preempts_and_completes_everything(models, preset, caplog):
    """A pool of 14 blocks of 4 tokens (one full context is 10) under 6 slots: decode runs out of blocks, the newest
    requests are preempted and recomputed later. Every request finishes with the unconstrained run's tokens (log-probs
    to 1e-5: a resumed request's next logits come from a prefill, not a decode step); all blocks come back."""
    model = models[preset]
    prompts = _prompts(10, seed=12, lo=6, hi=16)
    params = _sampling(10, max_tokens=14)
    kw = dict(max_batch_size=6, max_seq_len=40, kv_cache="paged", kv_block_size=4)
    want = Engine(model, **kw).generate(prompts, params)
    engine = Engine(model, kv_cache_blocks=15, **{k: v for k, v in kw.items()})
    with caplog.at_level(logging.INFO, logger="megatron_r1.inference.engine"):
        got = engine.generate(prompts, params)
    assert engine.stats["preemptions"] > 0 and engine.stats["kv_blocks_peak"] <= 14
    assert any("KV cache pool full" in r.getMessage() and "preempted" in r.getMessage() for r in caplog.records)
    _assert_same(got, want, tol=1e-5)
    assert engine.stats["requests_finished"] == 10
    _assert_all_free(engine)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_pool_of_one_context_still_admits_and_finishes(models, preset):
    """The smallest legal pool (one full context per slot, here one slot and one block): the admission watermark
    must not starve it (it did: generate() looped forever). Several requests run one after another."""
    model = models[preset]
    prompts = _prompts(3, seed=4, lo=6, hi=9)
    params = _sampling(3, max_tokens=5)
    kw = dict(max_batch_size=1, max_seq_len=14, kv_block_size=16)
    want = Engine(model, kv_cache="contiguous", **kw).generate(prompts, params)
    engine = Engine(model, kv_cache="paged", **kw)
    assert engine.cache.num_blocks - 1 == 1
    _assert_same(engine.generate(prompts, params), want, tol=1e-5)
    _assert_all_free(engine)


def test_pool_sizing(models):
    """kv_cache_memory_gb -> blocks by the per-token bytes; a pool smaller than one full-context request is refused."""
    model = models["deepseek_v3_tiny"]
    fn = FunctionalGPT(model, max_seq=64)
    per_tok = bytes_per_token(fn.cache_spec, fn.num_layers, fn.dtype)
    cfg = model.config
    assert per_tok == cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim) * 4  # fp32 latent + rope key
    gb = 100 * 8 * per_tok / 2 ** 30
    engine = Engine(model, max_batch_size=2, max_seq_len=64, kv_block_size=8, kv_cache_memory_gb=gb)
    assert engine.cache.num_blocks == blocks_for_memory(gb, 8, per_tok) == 100
    assert engine.cache.nbytes() == 100 * 8 * per_tok and engine.cache.bytes_per_token() == per_tok
    with pytest.raises(ConfigError, match="kv_cache_blocks"):
        Engine(model, max_batch_size=2, max_seq_len=64, kv_block_size=8, kv_cache_blocks=8)  # 7 usable < 8
    assert Engine(model, max_batch_size=3, max_seq_len=64, kv_block_size=8).cache.num_blocks == 3 * 8 + 1


# ------------------------------------------------------------------------------------------ TP = 2, EP = 2
PROMPTS = [[5, 17, 300, 42, 9], [100, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [400, 401], [5, 17, 300, 42, 9]]


def _generate(model, **kw):
    engine = Engine(model, max_batch_size=4, max_seq_len=32, **kw)
    res = engine.generate(PROMPTS, _sampling(len(PROMPTS), max_tokens=12))
    return [(r.token_ids, r.logprobs) for r in res], engine.stats["preemptions"]


def _rank_fn(rank, world, state_files):
    out = {}
    for preset, name, model, _ in sharded_models(state_files):
        # a pool of 10 blocks of 4 tokens for 4 slots of 32: preemption, decided alike on every rank
        out[(preset, name)] = _generate(model, kv_cache="paged", kv_block_size=4, kv_cache_blocks=11)
    return out


@pytest.mark.slow
def test_paged_tp2_ep2_with_preemption_equal_contiguous_tp1(parallel_tp1, tmp_path):
    refs, files = saved_models(tmp_path, 31, lambda model: _generate(model, kv_cache="contiguous")[0])
    results = run_distributed(_rank_fn, 2, files)
    for key, (gen, preemptions) in results[0].items():
        assert preemptions > 0, key
        assert results[1][key][0] == gen, key  # ranks agree on every token and log-prob
        for (tok, lp), (rtok, rlp) in zip(gen, refs[key[0]]):
            assert tok == rtok, key
            assert max(abs(a - b) for a, b in zip(lp, rlp)) < 1e-4, key
