"""Token-budget micro-batches (`training.max_tokens_per_micro_batch`): rows packed by padded tokens, each micro-batch
trimmed to its own rows, and the gradient of a mini-batch the same however it is split, for every aggregation."""
import pytest
import torch

from megatron_r1.rl.batch import collate, collate_shared_prefix
from megatron_r1.rl.policy_forward import padding_fraction, plan_micro_batches
from tests.distributed import run_distributed
from tests.rl.test_shared_prefix import G, model_config, rollouts


def test_plan_packs_by_padded_tokens():
    pb = collate(rollouts(), pad_id=0)  # rows of 11, 7, 15, 6, 6, 4, 18, 13, 16 input tokens
    lengths = pb.row_lengths.tolist()
    assert lengths == [11, 7, 15, 6, 6, 4, 18, 13, 16]
    plan = plan_micro_batches(pb, 2, max_tokens=36)
    assert sorted(i for rows in plan for i in rows) == list(range(9))
    for rows in plan:
        assert len(rows) == 1 or len(rows) * max(lengths[i] for i in rows) <= 36
    # longest first: (18, 16) (15, 13) (11, 7, 6) (6, 4)
    assert plan == [[6, 8], [2, 7], [0, 1, 3], [4, 5]]
    fixed = plan_micro_batches(pb, 2)
    assert fixed == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    assert padding_fraction(pb, plan) < padding_fraction(pb, fixed) < padding_fraction(pb, [list(range(9))])
    # a row longer than the budget is a micro-batch of its own
    assert plan_micro_batches(pb, 2, max_tokens=10)[0] == [6]


def test_trimmed_micro_batch_keeps_what_its_rows_need():
    pb = collate(rollouts(), pad_id=0, pad_multiple=4)
    mb = pb.take([3, 5]).trimmed()  # rows of 6 and 4 tokens -> width 8 (a multiple of 4), responses 4 and 2
    assert mb.tokens.shape == (2, 8) and mb.response_mask.shape == (2, 4)
    torch.testing.assert_close(mb.tokens, pb.tokens[[3, 5], :8])
    assert mb.response_index.max() < 8
    packed = collate_shared_prefix(rollouts(), pad_id=0)
    mb = packed.take([1]).trimmed()
    assert mb.tokens.shape[1] == int(packed.row_lengths[1]) and mb.attention_mask.shape[-1] == mb.tokens.shape[1]


def _grads(rank, world, loss_aggs):
    """One train_step's gradients for each (aggregation, split) from the same weights."""
    from megatron_r1.config import config_from_dict
    from megatron_r1.models.builder import build_model
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.policy_forward import compute_logprobs, hidden_mode, make_policy_loss_step, micro_batches
    from megatron_r1.training.setup import build_train_state, unwrap
    from megatron_r1.training.step import train_step

    base = model_config("llama_tiny")
    ctx = init_parallel(base.parallel, 3)
    init = {k: v.clone() for k, v in build_model(base.model, base.parallel, "fp32").state_dict().items()
            if isinstance(v, torch.Tensor)}
    rb = rollouts(vocab=base.model.vocab_size)
    out = {}
    state = build_train_state(base, ctx, 100)  # one state: each case starts again from `init`
    model = unwrap(state.model[0])
    for agg in loss_aggs:
        cfg = config_from_dict({**_plain(base), "rl": {**_plain(base)["rl"], "loss_agg": agg, "kl_coef": 0.01,
                                                        "max_response_length": 12, "shared_prefix": False}}, [])
        for split, (fn, mbs, budget) in {"one": (collate, 9, None), "fixed": (collate, 2, None),
                                         "budget": (collate, 2, 36),
                                         "packed_budget": (collate_shared_prefix, G, 30)}.items():
            pb = fn(rb, pad_id=0)
            model.load_state_dict(init, strict=False)
            lp = compute_logprobs(state.model, pb, mbs, 0.9, ctx.device, budget)
            pb.old_logprobs = lp + 0.1 * torch.sin(torch.arange(lp.numel(), dtype=lp.dtype)).view_as(lp)
            pb.ref_logprobs = lp - 0.05 * torch.arange(lp.shape[1], dtype=lp.dtype)
            plan = plan_micro_batches(pb, mbs, budget)
            with hidden_mode(state.model):
                result = train_step(state, make_policy_loss_step(cfg.rl, 0.9),
                                    micro_batches(pb, mbs, ctx.device, agg, plan=plan), len(plan),
                                    pb.tokens.shape[1], pb.rows(mbs))
            grads = {n: p.main_grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            out[(agg, split)] = {"grads": grads, "loss": result.loss, "n_micro": len(plan),
                                 "logprobs": lp * pb.response_mask}
    return out


def _plain(cfg):
    from megatron_r1.config import to_dict

    d = to_dict(cfg)
    d["model"] = {k: v for k, v in d["model"].items() if v is not None}
    return d


@pytest.mark.slow
def test_token_budget_gives_the_one_big_batch_gradient():
    aggs = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm")
    (out,) = run_distributed(_grads, 1, aggs)
    for agg in aggs:
        one = out[(agg, "one")]
        assert one["n_micro"] == 1
        for split in ("fixed", "budget", "packed_budget"):
            got = out[(agg, split)]
            assert got["n_micro"] > 1, split
            torch.testing.assert_close(got["logprobs"], one["logprobs"], rtol=0, atol=2e-5)
            assert got["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), (agg, split)
            for k, g in one["grads"].items():
                scale = float(g.abs().max())
                assert float((got["grads"][k] - g).abs().max()) <= 1e-5 * scale + 1e-9, (agg, split, k)
