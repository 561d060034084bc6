"""Backend choice (CUDA > Triton > chunked torch, env override) and the public API routed through it."""
import pytest
import torch

import megatron_r1.ops as ops
from megatron_r1.ops import reference as R
from megatron_r1.ops.dispatch import ENV, select_backend


def test_preference_order_by_device(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert select_backend("cuda", available={"cuda", "triton", "torch", "reference"}) == "cuda"
    assert select_backend("cuda", available={"triton", "torch", "reference"}) == "triton"
    assert select_backend("cuda", available={"torch", "reference"}) == "torch"
    # on CPU interpreted Triton is for tests only
    assert select_backend("cpu", available={"triton", "torch", "reference"}) == "torch"
    assert select_backend("cpu") == "torch"


def test_env_override(monkeypatch):
    for name in ("reference", "torch", "triton"):
        monkeypatch.setenv(ENV, name)
        assert select_backend("cpu") == name
        assert select_backend("cuda", available={"cuda"}) == name
    monkeypatch.setenv(ENV, "cuda")
    assert select_backend("cuda", available=set()) == "cuda"
    with pytest.raises(ValueError, match="cpu"):
        select_backend("cpu")
    monkeypatch.setenv(ENV, "fast")
    with pytest.raises(ValueError, match="reference"):
        select_backend("cpu")


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_public_api_agrees_across_backends(monkeypatch, backend):
    monkeypatch.setenv(ENV, backend)
    g = torch.Generator().manual_seed(5)
    b, l, h, v = 3, 5, 8, 37
    hid = torch.randn(b * l, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g, requires_grad=True)
    tok = torch.randint(0, v, (b * l,), generator=g)
    lp, ent = ops.token_logprobs(hid, w, tok, temperature=0.9, return_entropy=True)
    lp2 = ops.logprobs_from_logits(hid @ w.t(), tok, temperature=0.9)
    want_lp, want_ent = R.token_logprobs(hid, w, tok, 0.9, True)
    torch.testing.assert_close(lp, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp2, want_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, want_ent, rtol=1e-5, atol=1e-5)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5])
    torch.testing.assert_close(ops.group_advantages(rewards, 3), R.group_advantages(rewards, 3))
    torch.testing.assert_close(ops.group_advantages(rewards, 2, scale="none"),
                               R.group_advantages(rewards, 2, scale="none"))
    mask = torch.ones(b, l, dtype=torch.bool)
    old = lp.detach().view(b, l) - 0.1
    adv = torch.tensor([1.0, -1.0, 0.5])
    loss, metrics = ops.grpo_policy_loss(lp.view(b, l), old, adv, mask)
    fused, fmetrics = ops.fused_grpo_loss(hid.view(b, l, h), w, tok.view(b, l), old, adv, mask, temperature=0.9)
    torch.testing.assert_close(fused, loss, rtol=1e-5, atol=1e-6)
    assert set(metrics) <= set(fmetrics)
    for k in ("clip_frac_low", "clip_frac_high", "ratio_mean", "kl_mean"):
        assert k in metrics
