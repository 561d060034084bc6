"""Chunked torch and Triton (interpreted on CPU) log-probs and fused loss against the reference.

Shapes stay small and Triton's vocab block is forced small so the interpreter crosses several blocks per row
while the whole file runs in seconds.
"""
import pytest
import torch

from megatron_r1.ops import chunked
from megatron_r1.ops import reference as R
from megatron_r1.ops.loss import PolicyLossConfig
from megatron_r1.ops.rows_torch import TorchRows


def make_rows(name):
    if name == "torch":
        return TorchRows()
    from megatron_r1.ops.triton_kernels import TritonRows

    return TritonRows(block_v=32)


BACKENDS = ["torch", "triton"]
SHAPES = [(1, 8, 5), (37, 16, 101), (67, 24, 300)]
# The largest shape through the Triton interpreter takes ~10 s: the full suite runs it, the fast lane the others.
BACKEND_SHAPES = [pytest.param(b, s, id=f"{b}-{'x'.join(map(str, s))}",
                               marks=[pytest.mark.slow] if (b, s) == ("triton", SHAPES[-1]) else [])
                  for b in BACKENDS for s in SHAPES]


def _run(fn, inputs, grads):
    """Outputs and input gradients of fn(*inputs) under upstream gradients `grads`."""
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*xs)
    out = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(out, [g.to(o.dtype) for o, g in zip(out, grads)])
    return [o.detach() for o in out], [x.grad for x in xs]


def _assert_close(a, b, tol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,shape", BACKEND_SHAPES)
@pytest.mark.parametrize("temperature,entropy", [(1.0, False), (0.7, True)])
def test_token_logprobs_matches_reference(backend, shape, temperature, entropy):
    t, h, v = shape
    g = torch.Generator().manual_seed(t * 1000 + v)
    hid, w = torch.randn(t, h, generator=g), torch.randn(v, h, generator=g) * 0.5
    tok = torch.randint(0, v, (t,), generator=g)
    ups = [torch.randn(t, generator=g) for _ in range(2 if entropy else 1)]
    rows = make_rows(backend)
    got = _run(lambda a, b: chunked.token_logprobs(a, b, tok, temperature, entropy, rows=rows, chunk_tokens=16),
               (hid, w), ups)
    want = _run(lambda a, b: R.token_logprobs(a, b, tok, temperature, entropy), (hid, w), ups)
    _assert_close(got[0], want[0], 1e-4)
    _assert_close(got[1], want[1], 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_only_gradient(backend):
    # autograd hands None for the unused log-prob gradient
    g = torch.Generator().manual_seed(3)
    hid, w, tok = torch.randn(9, 8, generator=g), torch.randn(40, 8, generator=g), torch.randint(0, 40, (9,))

    def ent_only(fn, **kw):
        x = hid.clone().requires_grad_(True)
        fn(x, w, tok, 1.0, True, **kw)[1].sum().backward()
        return x.grad

    torch.testing.assert_close(ent_only(chunked.token_logprobs, rows=make_rows(backend), chunk_tokens=4),
                               ent_only(R.token_logprobs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True])
def test_logprobs_from_logits_extreme_values(backend, entropy):
    # logits near ±1e4: any exp() without the max shift overflows
    g = torch.Generator().manual_seed(1)
    t, v = 23, 77
    logits = torch.randn(t, v, generator=g) * 3 + torch.where(torch.rand(t, v, generator=g) < 0.5, 1e4, -1e4)
    tok = torch.randint(0, v, (t,), generator=g)
    ups = [torch.randn(t, generator=g) for _ in range(2 if entropy else 1)]
    got = _run(lambda x: chunked.logprobs_from_logits(x, tok, 1.3, entropy, rows=make_rows(backend),
                                                      chunk_tokens=8), (logits,), ups)
    want = _run(lambda x: R.logprobs_from_logits(x.double(), tok, 1.3, entropy), (logits,), ups)
    assert all(torch.isfinite(o).all() for o in got[0] + got[1])
    # fp32 spacing near 1e4 is ~1e-3, which bounds what any fp32 kernel can match a float64 reference to
    _assert_close(got[0], want[0], 2e-3)
    _assert_close(got[1], want[1], 2e-3)
    assert got[1][0].dtype == logits.dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend):
    g = torch.Generator().manual_seed(2)
    t, h, v = 29, 16, 131
    hid = torch.randn(t, h, generator=g).bfloat16()
    w = (torch.randn(v, h, generator=g) * 0.5).bfloat16()
    tok = torch.randint(0, v, (t,), generator=g)
    ups = [torch.randn(t, generator=g)]
    rows = make_rows(backend)
    got = _run(lambda a, b: chunked.token_logprobs(a, b, tok, 0.9, rows=rows, chunk_tokens=8), (hid, w), ups)
    want = _run(lambda a, b: R.token_logprobs(a, b, tok, 0.9), (hid, w), ups)
    assert got[0][0].dtype == torch.float32
    assert got[1][0].dtype == torch.bfloat16 and got[1][1].dtype == torch.bfloat16
    _assert_close(got[0], want[0], 1e-4)  # both compute from the same bf16 values in fp32
    _assert_close(got[1], want[1], 2e-2)  # gradients are rounded to bf16
    logits = (hid.float() @ w.float().t()).bfloat16()
    got = _run(lambda x: chunked.logprobs_from_logits(x, tok, 1.0, rows=rows, chunk_tokens=8), (logits,), ups)
    want = _run(lambda x: R.logprobs_from_logits(x, tok), (logits,), ups)
    _assert_close(got[0], want[0], 1e-4)
    _assert_close(got[1], want[1], 1e-2)


LOSS_CASES = [
    dict(),
    dict(loss_agg="token-mean", kl_coef=0.1, kl_estimator="k1", clip_high=0.28),
    dict(loss_agg="seq-mean-token-sum-norm", max_response_length=9, kl_coef=0.05, kl_estimator="k2", tis_cap=1.5,
         tis_on_kl=True),
    dict(kl_coef=0.04, policy_loss="gspo", tis_cap=2.0),
    dict(kl_coef=0.04, policy_loss="gspo", tis_cap=2.0, tis_level="sequence"),
    dict(policy_loss="dual_clip", clip_ratio_c=1.3, kl_coef=0.1, kl_clamp=0.05, tis_cap=1.2),
    dict(policy_loss="cispo", clip_low=1.0, clip_high=0.1, loss_agg="token-mean", kl_coef=0.1, tis_cap=1.5,
         tis_level="sequence"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_fused_loss_matches_composition(backend, case):
    kw = LOSS_CASES[case]
    g = torch.Generator().manual_seed(10 + case)
    b, l, h, v = 5, 7, 12, 53
    hid, w = torch.randn(b, l, h, generator=g), torch.randn(v, h, generator=g) * 0.7
    tok = torch.randint(0, v, (b, l), generator=g)
    mask = torch.rand(b, l, generator=g) < 0.7
    mask[2] = False  # an empty answer
    with torch.no_grad():
        base = R.token_logprobs(hid.view(-1, h), w, tok.view(-1), 0.8).view(b, l)
    old = base + 0.3 * torch.randn(b, l, generator=g)
    extra = dict(ref_logprobs=base + 0.2 * torch.randn(b, l, generator=g),
                 behavior_logprobs=old + 0.2 * torch.randn(b, l, generator=g))
    adv = torch.randn(b, generator=g)
    rows = make_rows(backend)

    def fused(x, y):
        cfg = PolicyLossConfig(**{k: v for k, v in kw.items()})
        return chunked.fused_policy_loss(x, y, tok, old, adv, mask, cfg, temperature=0.8, rows=rows, chunk_tokens=6,
                                         **extra)

    def composed(x, y):
        lp = R.token_logprobs(x.view(-1, h), y, tok.view(-1), 0.8).view(b, l)
        return R.grpo_policy_loss(lp, old, adv, mask, **extra, **kw)

    (l1, m1), (l2, m2) = fused(hid, w), composed(hid, w)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m2.keys()
    for k in m2:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-6)
    got = _run(lambda x, y: fused(x, y)[0], (hid, w), [torch.tensor(2.0)])
    want = _run(lambda x, y: composed(x, y)[0], (hid, w), [torch.tensor(2.0)])
    _assert_close(got[1], want[1], 1e-5)
    assert torch.isfinite(got[1][0]).all()


def test_chunk_rows_bounds_the_buffer():
    assert chunked.chunk_rows(4096, 32000, None) * 32000 * 4 <= chunked.DEFAULT_CHUNK_BYTES
    assert chunked.chunk_rows(4096, 10**9, None) == 1
    assert chunked.chunk_rows(3, 10, 100) == 3


def test_rejects_bad_temperature():
    with pytest.raises(ValueError):
        chunked.token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), 0.0,
                               rows=TorchRows())


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_logits(backend):
    g = torch.Generator().manual_seed(4)
    logits_t = torch.randn(31, 19, generator=g)  # [V, T], read as its transpose
    tok = torch.randint(0, 31, (19,), generator=g)
    ups = [torch.randn(19, generator=g)]
    got = _run(lambda x: chunked.logprobs_from_logits(x.t(), tok, 1.0, rows=make_rows(backend), chunk_tokens=7),
               (logits_t,), ups)
    want = _run(lambda x: R.logprobs_from_logits(x.t(), tok), (logits_t,), ups)
    _assert_close(got[0], want[0], 1e-5)
    _assert_close(got[1], want[1], 1e-5)
