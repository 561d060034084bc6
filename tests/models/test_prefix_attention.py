"""Block attention of shared-prefix rows (`megatron_r1.models.prefix_attention`) equals the dense-mask attention it
replaces: outputs and gradients of q, k, v, with ragged prompts and answers, empty answers, padding, MLA's differing
K/V head sizes and GQA."""
import pytest
import torch

from megatron_r1.models.local_layers import SDPACoreAttention
from megatron_r1.models.prefix_attention import PrefixLayout, calls, dense_mask, prefix_attention, segment_mask
from megatron_r1.rl.batch import shared_prefix_mask


def segments(rows, s):
    """[b, S] segments from (prompt length, answer input lengths) per row; the rest is padding."""
    out = torch.full((len(rows), s), -1, dtype=torch.long)
    for i, (p, answers) in enumerate(rows):
        seg = [0] * p + [j + 1 for j, n in enumerate(answers) for _ in range(n)]
        out[i, : len(seg)] = torch.tensor(seg)
    return out


RAGGED = [(7, (4, 0, 8)), (3, (3, 3, 1)), (11, (7, 2, 5))]  # S = 30: rows 0 and 1 end in padding
NO_ANSWER_INPUTS = [(5, (0, 0, 0)), (2, (0, 0, 0))]  # one-token answers only: nothing but prompts and padding


def core(heads: int):
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=16 * heads, num_attention_heads=heads, attention_dropout=0.0)
    return SDPACoreAttention(cfg, 1, None, None, softmax_scale=0.3)


def attention(module, q, k, v, mask, layout):
    q, k, v = (x.clone().requires_grad_(True) for x in (q, k, v))
    if layout is None:
        out = module(q, k, v, mask)
    else:
        with prefix_attention(module, layout):
            out = module(q, k, v, mask)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("rows,s", [(RAGGED, 30), (NO_ANSWER_INPUTS, 8)])
@pytest.mark.parametrize("nq,nkv,dk,dv", [(4, 4, 48, 32), (4, 2, 16, 16), (6, 2, 24, 8)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocks_equal_the_dense_mask(rows, s, nq, nkv, dk, dv, dtype):
    g = torch.Generator().manual_seed(nq * 100 + dk)
    b = len(rows)
    q = torch.randn(s, b, nq, dk, generator=g, dtype=dtype)
    k = torch.randn(s, b, nkv, dk, generator=g, dtype=dtype)
    v = torch.randn(s, b, nkv, dv, generator=g, dtype=dtype)
    seg = segments(rows, s)
    mask = shared_prefix_mask(seg)
    layout = PrefixLayout.from_segments(seg, 3, mask)
    module = core(nq)
    calls.clear()
    dense = attention(module, q, k, v, mask, None)
    blocks = attention(module, q, k, v, mask, layout)
    assert calls == {"dense_mask": 1, "blocks": 1}
    eps = 1e-12 if dtype == torch.float64 else 2e-6  # fp32: the kernels sum in different orders
    for name, a, d in zip(("out", "dq", "dk", "dv"), blocks, dense):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, d, rtol=0, atol=eps * float(d.abs().max()), msg=name)


def test_segment_mask_runs_blocks_in_its_layout_and_the_dense_mask_outside():
    """The O(S) segment mask: per block while its layout is active; outside it (activation recompute) expanded to
    the dense mask, with the dense mask's results."""
    seg = segments(RAGGED, 30)
    smask = segment_mask(seg)
    assert smask.shape == (3, 1, 1, 30) and torch.equal(dense_mask(smask), shared_prefix_mask(seg))
    layout = PrefixLayout.from_segments(seg, 3, smask)
    module = core(4)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(30, 3, n, 16, generator=g, dtype=torch.float64) for n in (4, 2, 2))
    calls.clear()
    ref = attention(module, q, k, v, shared_prefix_mask(seg), None)
    outside = attention(module, q, k, v, smask, None)
    blocks = attention(module, q, k, v, smask, layout)
    assert calls == {"dense_mask": 2, "blocks": 1}
    for a, b, r in zip(outside, blocks, ref):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
        torch.testing.assert_close(b, r, rtol=0, atol=1e-12 * float(r.abs().max()))


def test_another_mask_takes_the_dense_path():
    seg = segments(RAGGED, 30)
    mask = shared_prefix_mask(seg)
    layout = PrefixLayout.from_segments(seg, 3, mask)
    module = core(2)
    q = torch.randn(30, 3, 2, 8)
    calls.clear()
    with prefix_attention(module, layout):
        module(q, q, q, mask.clone())
        module(q, q, q, None)
    module(q, q, q, mask)  # outside the block
    assert calls == {"dense_mask": 2, "causal": 1}
    assert module.prefix_layout is None


def test_layout_of_a_collated_batch():
    from tests.rl.test_shared_prefix import rollouts
    from megatron_r1.rl.batch import collate_shared_prefix

    pb = collate_shared_prefix(rollouts(), pad_id=0, pad_multiple=4)
    layout = PrefixLayout.from_segments(pb.segments, pb.answers_per_row, pb.attention_mask)
    b, s = pb.tokens.shape
    assert (layout.rows, layout.seq_len, layout.prompt_len, layout.answers, layout.answer_len) == (b, s, 11, 3, 8)
    # the third answer of group 0 (8 inputs at columns 11..18) reads its row's 11 prompt columns, then itself
    keys = layout.kv_index.view(b, 3, 19)[0, 2]
    assert keys[:11].tolist() == [c * b for c in range(11)] and keys[11:].tolist() == [c * b for c in range(11, 19)]
    allowed = layout.answer_allowed.view(b, 3, 8, 19)[0, 2]
    assert allowed[:, :7].all() and not allowed[:, 7:11].any()  # a 7-token prompt: columns 7..10 are not prompt
    assert torch.equal(allowed[:, 11:], torch.ones(8, 8, dtype=torch.bool).tril())
    assert len(layout.pad_index) == int((pb.segments < 0).sum())


def reference(q, k, v, allowed, scale):
    """Attention in float64 by its definition: softmax(q·kᵀ·scale over allowed keys)·v, [s, b, heads, d] layout."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (x.double().permute(1, 2, 0, 3) for x in (q, k, v))
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    out = scores.softmax(-1) @ v
    return out.permute(2, 0, 1, 3).flatten(2)


@pytest.mark.parametrize("masked", [False, True])
def test_mla_head_sizes_use_the_fused_cpu_kernel(masked):
    """K wider than V (MLA): V is zero-padded to K's size so SDPA can take its fused CPU kernel; same values."""
    from torch.profiler import profile

    s, b, nq, nkv = 30, 3, 4, 2
    seg = segments(RAGGED, s)
    mask = shared_prefix_mask(seg) if masked else None
    allowed = ~mask if masked else torch.ones(s, s, dtype=torch.bool).tril()
    q, k, v = torch.randn(s, b, nq, 48), torch.randn(s, b, nkv, 48), torch.randn(s, b, nkv, 32)
    module = core(nq)
    with profile() as prof:
        out = module(q, k, v, mask)
    assert out.shape == (s, b, nq * 32)
    torch.testing.assert_close(out.double(), reference(q, k, v, allowed, 0.3), rtol=0, atol=1e-5)
    assert any("flash_attention_for_cpu" in e.key for e in prof.key_averages())
