"""CUDA extension and Triton kernels against the reference on a GPU (skipped without one)."""
import os

import pytest
import torch

import megatron_r1.ops as ops
from megatron_r1.ops import chunked
from megatron_r1.ops import reference as R
from megatron_r1.ops.dispatch import ENV

pytestmark = pytest.mark.gpu


def _rows(name):
    if name == "cuda":
        from megatron_r1.ops.cuda_ext import CudaRows

        return CudaRows()
    from megatron_r1.ops.triton_kernels import TritonRows

    return TritonRows()


def _grads(fn, inputs, ups):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [u.to(o.dtype) for o, u in zip(out, ups)])
    return [o.detach().float() for o in out] + [x.grad.float() for x in xs]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,h,v", [(1, 64, 7), (257, 128, 1001), (1024, 256, 32000)])
def test_token_logprobs_gpu(backend, dtype, t, h, v):
    g = torch.Generator(device="cuda").manual_seed(t + v)
    hid = torch.randn(t, h, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.1).to(dtype)
    tok = torch.randint(0, v, (t,), device="cuda", generator=g)
    ups = [torch.randn(t, device="cuda", generator=g) for _ in range(2)]
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1" and t * v > 10**6:
        pytest.skip("tests/conftest.py runs Triton interpreted; too slow at this size")
    rows = _rows(backend)
    got = _grads(lambda a, b: chunked.token_logprobs(a, b, tok, 0.7, True, rows=rows, chunk_tokens=100),
                 (hid, w), ups)
    want = _grads(lambda a, b: R.token_logprobs(a, b, tok, 0.7, True), (hid, w), ups)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_logprobs_from_logits_gpu_extremes(backend):
    g = torch.Generator(device="cuda").manual_seed(0)
    t, v = 67, 5003
    logits = torch.randn(t, v, device="cuda", generator=g) * 3
    logits += torch.where(torch.rand(t, v, device="cuda", generator=g) < 0.5, 1e4, -1e4)
    tok = torch.randint(0, v, (t,), device="cuda", generator=g)
    ups = [torch.randn(t, device="cuda", generator=g) for _ in range(2)]
    got = _grads(lambda x: chunked.logprobs_from_logits(x, tok, 1.3, True, rows=_rows(backend)), (logits,), ups)
    want = _grads(lambda x: R.logprobs_from_logits(x.double(), tok, 1.3, True), (logits,), ups)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_group_advantages_gpu(monkeypatch, backend):
    monkeypatch.setenv(ENV, backend)
    r = torch.rand(48, device="cuda")
    for g in (1, 4, 16, 48):
        for scale in ("std", "none"):
            torch.testing.assert_close(ops.group_advantages(r, g, scale), R.group_advantages(r, g, scale))


@pytest.mark.parametrize("kw", [dict(), dict(kl_coef=0.1, kl_estimator="k1", loss_agg="token-mean"),
                                dict(kl_coef=0.1, kl_estimator="k2", tis_cap=1.5),
                                dict(kl_coef=0.04, loss_agg="seq-mean-token-sum-norm", clip_high=0.28,
                                     max_response_length=40)])
def test_policy_loss_cuda(monkeypatch, kw):
    g = torch.Generator(device="cuda").manual_seed(1)
    b, l = 6, 33
    lp = -torch.rand(b, l, device="cuda", generator=g) * 3
    old = lp + 0.3 * torch.randn(b, l, device="cuda", generator=g)
    extra = dict(ref_logprobs=lp + 0.2 * torch.randn(b, l, device="cuda", generator=g),
                 behavior_logprobs=old + 0.2 * torch.randn(b, l, device="cuda", generator=g))
    mask = torch.rand(b, l, device="cuda", generator=g) < 0.8
    mask[1] = False
    adv = torch.randn(b, device="cuda", generator=g)
    monkeypatch.setenv(ENV, "cuda")
    x1 = lp.clone().requires_grad_(True)
    l1, m1 = ops.grpo_policy_loss(x1, old, adv, mask, **extra, **kw)
    l1.backward()
    x2 = lp.clone().requires_grad_(True)
    l2, m2 = R.grpo_policy_loss(x2, old, adv, mask, **extra, **kw)
    l2.backward()
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean"):
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6)


def test_dispatch_picks_cuda_on_gpu(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert ops.select_backend("cuda") == "cuda"
