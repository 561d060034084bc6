"""Pipeline-parallel generation equals PP=1: the same tokens and log-probs on every rank, for a dense and an MLA/MoE
model, PP=2 (uneven stages too) and TP=2 x PP=2; the full state dict gathers back across stages."""
import pytest
import torch

from megatron_r1.inference import Engine, SamplingParams
from tests.distributed import run_distributed

from .conftest import make_model

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 300, 42, 9], [100, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [400, 401], [5, 17, 300, 42, 9]]
SAMPLING = [SamplingParams(temperature=0, max_tokens=8), SamplingParams(temperature=0, max_tokens=5),
            SamplingParams(temperature=1.0, seed=3, max_tokens=8),
            SamplingParams(temperature=0.8, seed=4, max_tokens=6),
            SamplingParams(temperature=1.0, seed=5, max_tokens=7)]  # shares the first prompt's prefill


def _generate(model, **engine_kw):
    # 3 slots for 5 prompts: continuous batching; a small paged pool: preemption on every stage alike
    engine = Engine(model, max_batch_size=3, max_seq_len=32, kv_cache="paged", kv_block_size=4, **engine_kw)
    results = engine.generate(PROMPTS, SAMPLING)
    routing = [r.routing for r in results] if engine.record_routing else None
    return [(r.token_ids, r.logprobs) for r in results], routing, engine.routing_layers, engine.stats["preemptions"]


def _rank_fn(rank, world, state_files, layouts):
    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import weights
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

    torch.manual_seed(100 + rank)  # different init per rank: only the loaded weights can make outputs agree
    out = {}
    for preset, path in state_files.items():
        full = torch.load(path)
        for name, layout in layouts.items():
            init_parallel(ParallelConfig(**layout))
            model = build_model(get_preset(preset), ParallelConfig(**layout), "fp32").eval()
            weights.load_full_state_dict(model, full)
            back = weights.full_state_dict(model)  # gathered over TP and every stage
            gather_err = max((back[k] - full[k]).abs().max().item() for k in full)
            moe = preset == "deepseek_v3_tiny"
            out[(preset, name)] = (_generate(model, kv_cache_blocks=9, record_routing=moe), gather_err,
                                   sorted(back) == sorted(full))
    return out


def _check(results, refs):
    for key, (gen, gather_err, same_keys) in results[0].items():
        assert same_keys and gather_err == 0.0, key
        (toks_lps, _, _, preempted) = gen
        assert preempted > 0, key  # the pool was small enough to preempt: stages must have stayed in step
        for r in results[1:]:  # every rank (every stage) returns exactly the same tokens and log-probs
            assert r[key][0][0] == toks_lps, key
        ref = refs[key[0]]
        worst = 0.0
        for (toks, lps), (ref_toks, ref_lps) in zip(toks_lps, ref[0]):
            assert toks == ref_toks, key
            worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref_lps)))
        print(f"\n{key}: max |log-prob - PP=1| {worst:.2e}")
        assert worst < 1e-4, key
        if ref[1] is not None:  # routing: each stage recorded its own MoE layers, by global layer index
            layers = sorted({n for r in results for n in r[key][0][2]})
            assert layers == list(ref[2]), key
            for r in results:
                local = r[key][0][2]
                for got, want in zip(r[key][0][1], ref[1]):
                    idx = [list(ref[2]).index(n) for n in local]
                    assert torch.equal(got, want[:, idx]), key


@pytest.fixture(scope="module")
def references(parallel_tp1, tmp_path_factory):
    from megatron_r1.inference import weights

    tmp = tmp_path_factory.mktemp("pp")
    refs, files = {}, {}
    for preset in ("deepseek_v3_tiny", "llama_tiny"):
        model = make_model(preset, seed=21)
        refs[preset] = _generate(model, kv_cache_blocks=9, record_routing=preset == "deepseek_v3_tiny")
        files[preset] = str(tmp / f"{preset}.pt")
        torch.save(weights.full_state_dict(model), files[preset])
    return refs, files


def test_pp2_equals_pp1(references):
    refs, files = references
    layouts = {"pp2": dict(pipeline_model_parallel_size=2)}
    _check(run_distributed(_rank_fn, 2, files, layouts), refs)


def test_uneven_stages_and_tp2_pp2_equal_pp1(references):
    refs, files = references
    # deepseek_v3_tiny has 4 layers: 1 on the first stage, 3 on the last (DeepSeek-V3's own uneven split)
    layouts = {"tp2pp2": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)}
    _check(run_distributed(_rank_fn, 4, {"llama_tiny": files["llama_tiny"]}, layouts), refs)
    uneven = {"pp2_1_3": dict(pipeline_model_parallel_size=2, num_layers_in_first_pipeline_stage=1,
                              num_layers_in_last_pipeline_stage=3)}
    _check(run_distributed(_rank_fn, 2, {"deepseek_v3_tiny": files["deepseek_v3_tiny"]}, uneven), refs)
