"""token_logprobs and logprobs_from_logits with a 2-rank gloo TP group equal the single-process result."""
import pytest
import torch

from megatron_r1.ops import _tp, chunked
from megatron_r1.ops import reference as R
from megatron_r1.ops.rows_torch import TorchRows
from tests.distributed import run_distributed

T, H, V, TEMP = 13, 8, 22, 0.8


def _data():
    g = torch.Generator().manual_seed(0)
    hid, w = torch.randn(T, H, generator=g), torch.randn(V, H, generator=g)
    tok = torch.randint(0, V, (T,), generator=g)
    return hid, w, tok, torch.randn(T, generator=g), torch.randn(T, generator=g)


def _grads(fn, hid, w, g_lp, g_ent):
    hid, w = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = fn(hid, w)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return lp.detach(), ent.detach(), hid.grad, w.grad


def _rank(rank, world, impl):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    hid, w, tok, g_lp, g_ent = _data()
    shard = V // world
    w_local = w[rank * shard:(rank + 1) * shard]

    def logits(x, y):
        # what Megatron's ColumnParallelLinear does: replicated input, its gradient summed over the group
        return _tp.copy_to_tp(x, group) @ y.t()
    if impl == "reference":
        def from_hidden(x, y):
            return R.token_logprobs(x, y, tok, TEMP, True, tp_group=group)

        def from_logits(x, y):
            return R.logprobs_from_logits(logits(x, y), tok, TEMP, True, tp_group=group)
    else:
        rows = TorchRows()

        def from_hidden(x, y):
            return chunked.token_logprobs(x, y, tok, TEMP, True, group, rows=rows, chunk_tokens=4)

        def from_logits(x, y):
            return chunked.logprobs_from_logits(logits(x, y), tok, TEMP, True, group, rows=rows, chunk_tokens=5)
    # numpy, not tensors: torch's queue shares tensor storage through a socket that dies with the rank
    return [[t.numpy() for t in _grads(fn, hid, w_local, g_lp, g_ent)] for fn in (from_hidden, from_logits)]


def _check(results):
    hid, w, tok, g_lp, g_ent = _data()
    want = _grads(lambda x, y: R.token_logprobs(x, y, tok, TEMP, True), hid, w, g_lp, g_ent)
    shard = V // len(results)
    for rank, per_rank in enumerate(results):
        for arrays in per_rank:
            lp, ent, g_hid, g_w = map(torch.from_numpy, arrays)
            torch.testing.assert_close(lp, want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent, want[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_hid, want[2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_w, want[3][rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_chunked_tp2_equals_single_process():
    _check(run_distributed(_rank, 2, "torch"))


@pytest.mark.slow
def test_reference_tp2_equals_single_process():
    _check(run_distributed(_rank, 2, "reference"))


def _fused_inputs():
    hid, w, tok, _, _ = _data()
    g = torch.Generator().manual_seed(1)
    b, l = 13, 1
    old = R.token_logprobs(hid, w, tok, TEMP).detach().view(b, l) + 0.3 * torch.randn(b, l, generator=g)
    mask = torch.rand(b, l, generator=g) < 0.8
    return hid.view(b, l, H), w, tok.view(b, l), old, torch.randn(b, generator=g), mask


def _fused_loss_grads(hid, w, group, rows):
    _, _, tok, old, adv, mask = _fused_inputs()
    hid, w = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    if rows is None:
        lp = R.token_logprobs(hid.view(-1, H), w, tok.view(-1), TEMP).view(old.shape)
        loss, _ = R.grpo_policy_loss(lp, old, adv, mask, loss_agg="token-mean")
    else:
        from megatron_r1.ops.loss import PolicyLossConfig

        loss, _ = chunked.fused_policy_loss(hid, w, tok, old, adv, mask, PolicyLossConfig(loss_agg="token-mean"),
                                            temperature=TEMP, tp_group=group, rows=rows, chunk_tokens=5)
    loss.backward()
    return [loss.detach().numpy(), hid.grad.numpy(), w.grad.numpy()]


def _rank_fused(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    hid, w = _fused_inputs()[:2]
    shard = V // world
    return _fused_loss_grads(hid, w[rank * shard:(rank + 1) * shard], group, TorchRows())


@pytest.mark.slow
def test_fused_loss_tp2_equals_single_process():
    hid, w = _fused_inputs()[:2]
    want = [torch.from_numpy(a) for a in _fused_loss_grads(hid, w, None, None)]
    shard = V // 2
    for rank, arrays in enumerate(run_distributed(_rank_fused, 2)):
        loss, g_hid, g_w = map(torch.from_numpy, arrays)
        torch.testing.assert_close(loss, want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_hid, want[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_w, want[2][rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-6)
