"""TP=2 and EP=2 generation equal TP=1 (same weights, resharded in memory), and ranks agree on every token."""
import pytest
import torch

from megatron_r1.inference import Engine, SamplingParams
from tests.distributed import run_distributed

from .conftest import saved_models, sharded_models

PROMPTS = [[5, 17, 300, 42, 9], [100, 2, 3], [7, 8, 9, 10, 11, 12, 13, 14], [400, 401]]
SAMPLING = [SamplingParams(temperature=0, max_tokens=8), SamplingParams(temperature=0, max_tokens=5),
            SamplingParams(temperature=1.0, seed=3, max_tokens=8), SamplingParams(temperature=0.8, seed=4,
                                                                                 max_tokens=6)]


def _generate(model):
    engine = Engine(model, max_batch_size=3, max_seq_len=64)  # 3 slots for 4 prompts: continuous batching too
    return [(r.token_ids, r.logprobs) for r in engine.generate(PROMPTS, SAMPLING)]


def _rank_fn(rank, world, state_files):
    from megatron_r1.inference import weights

    torch.manual_seed(100 + rank)  # different init per rank: only the loaded weights can make outputs agree
    out = {}
    for preset, name, model, full in sharded_models(state_files):
        # gathering back reproduces the original tensors (the layout-differs refit path, both directions)
        back = weights.full_state_dict(model)
        gather_err = max((back[k] - full[k]).abs().max().item() for k in full)
        out[(preset, name)] = (_generate(model), gather_err, sorted(back) == sorted(full))
    return out


@pytest.mark.slow
def test_tp2_and_ep2_equal_tp1(parallel_tp1, tmp_path):
    refs, files = saved_models(tmp_path, 21, _generate)
    results = run_distributed(_rank_fn, 2, files)
    for key, (gen, gather_err, same_keys) in results[0].items():
        assert same_keys and gather_err == 0.0, key
        ref = refs[key[0]]
        for r in results[1:]:  # every rank returns exactly the same tokens and log-probs
            assert r[key][0] == gen, key
        worst = 0.0
        for (toks, lps), (ref_toks, ref_lps) in zip(gen, ref):
            assert toks == ref_toks, key
            worst = max(worst, max(abs(a - b) for a, b in zip(lps, ref_lps)))
        print(f"\n{key}: max |log-prob - TP=1| {worst:.2e}")
        assert worst < 1e-4, key
