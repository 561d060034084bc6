"""token_logprobs and logprobs_from_logits with a 2-rank gloo TP group equal the single-process result."""
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
    return _grads(from_hidden, hid, w_local, g_lp, g_ent), _grads(from_logits, hid, w_local, g_lp, g_ent)


def _check(results):
    hid, w, tok, g_lp, g_ent = _data()
    want = _grads(lambda x, y: R.token_logprobs(x, y, tok, TEMP, True), hid, w, g_lp, g_ent)
    shard = V // len(results)
    for rank, per_rank in enumerate(results):
        for lp, ent, g_hid, g_w in per_rank:
            torch.testing.assert_close(lp, want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ent, want[1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_hid, want[2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(g_w, want[3][rank * shard:(rank + 1) * shard], rtol=1e-5, atol=1e-5)


def test_chunked_tp2_equals_single_process():
    _check(run_distributed(_rank, 2, "torch"))


def test_reference_tp2_equals_single_process():
    _check(run_distributed(_rank, 2, "reference"))
