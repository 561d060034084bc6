"""Triton kernels: per-row online log-sum-exp over vocab blocks (forward), gradient w.r.t. logits (backward),
and group advantages.

The matmuls around them stay in cuBLAS (see chunked.py); these kernels replace the memory-bound passes over a
[c, V] logits chunk with one read (forward) and one read + one write (backward), any input dtype, fp32 math.
Tests run them on the CPU under TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from .chunked import _zeros_like_or


@triton.jit
def _lse_fwd_kernel(x_ptr, stride_x, tok_ptr, lse_ptr, tgt_ptr, ez_ptr, vocab_start, V, inv_temp,
                    WANT_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    a = tl.zeros((), tl.float32)  # Σ exp(z − m)·z, rescaled with s
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        z = tl.load(x_row + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        p = tl.where(valid, tl.exp(z - m_new), 0.0)
        s = s * alpha + tl.sum(p, 0)
        if WANT_ENT:
            a = a * alpha + tl.sum(p * tl.where(valid, z, 0.0), 0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(s))
    if WANT_ENT:
        tl.store(ez_ptr + row, a / s)
    local = tl.load(tok_ptr + row).to(tl.int64) - vocab_start
    in_shard = (local >= 0) & (local < V)
    t = tl.load(x_row + tl.where(in_shard, local, 0)).to(tl.float32) * inv_temp
    tl.store(tgt_ptr + row, tl.where(in_shard, t, 0.0))


@triton.jit
def _lse_bwd_kernel(x_ptr, stride_x, out_ptr, stride_out, tok_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
                    vocab_start, V, inv_temp, HAS_ENT: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(glp_ptr + row)
    if HAS_ENT:
        ent = tl.load(ent_ptr + row)
        g_ent = tl.load(gent_ptr + row)
    local = tl.load(tok_ptr + row).to(tl.int64) - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < V
        logp = tl.load(x_ptr + row * stride_x + cols, mask=valid, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logp)
        # d log p_target / dz = onehot − p;  dH/dz = −p·(log p + H)
        coef = g_lp
        if HAS_ENT:
            coef = coef + g_ent * (logp + ent)
        g = tl.where(cols == local, g_lp, 0.0) - p * coef
        tl.store(out_ptr + row * stride_out + cols, (g * inv_temp).to(out_ptr.dtype.element_ty), mask=valid)


def _block_v(v, block_v):
    return block_v or min(4096, triton.next_power_of_2(v))


class TritonRows:
    """Row primitives for chunked.py backed by the kernels above; the logits chunk is only read."""

    name = "triton"
    stats_clobbers_input = False

    def __init__(self, block_v=None):
        self.block_v = block_v

    def stats_(self, x, tokens, vocab_start, inv_temp, want_ent):
        x = x if x.stride(1) == 1 else x.contiguous()
        c, v = x.shape
        lse = torch.empty(c, device=x.device, dtype=torch.float32)
        tgt = torch.empty_like(lse)
        ez = torch.empty_like(lse) if want_ent else lse
        if c:
            _lse_fwd_kernel[(c,)](x, x.stride(0), tokens.contiguous(), lse, tgt, ez, vocab_start, v,
                                  float(inv_temp), WANT_ENT=bool(want_ent), BLOCK_V=_block_v(v, self.block_v))
        local = tokens.long() - vocab_start
        return lse, tgt, (local >= 0) & (local < v), (ez if want_ent else None), None

    def grad_after_stats_(self, x, state, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent):
        return self.grad_from_logits(x, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent, x)

    def grad_from_logits(self, x, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent, out):
        x = x if x.stride(1) == 1 else x.contiguous()
        c, v = x.shape
        if c == 0:
            return out
        g_lp = _zeros_like_or(g_lp, lse)
        has_ent = g_ent is not None
        ent_t = ent.float().contiguous() if has_ent else lse
        g_ent_t = g_ent.float().contiguous() if has_ent else lse
        _lse_bwd_kernel[(c,)](x, x.stride(0), out, out.stride(0), tokens.contiguous(), lse.contiguous(), ent_t,
                              g_lp, g_ent_t, vocab_start, v, float(inv_temp), HAS_ENT=has_ent,
                              BLOCK_V=_block_v(v, self.block_v))
        return out


@triton.jit
def _group_adv_kernel(r_ptr, out_ptr, G, eps, USE_STD: tl.constexpr, SAMPLE_STD: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    grp = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_G)
    valid = idx < G
    r = tl.load(r_ptr + grp * G + idx, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(r, 0) / G
    d = tl.where(valid, r - mean, 0.0)
    if USE_STD:
        ss = tl.sum(d * d, 0)
        if SAMPLE_STD:
            var = ss / (G - 1)
        else:
            var = ss / G
        d = d / (tl.sqrt(var) + eps)
    tl.store(out_ptr + grp * G + idx, d, mask=valid)


def group_advantages(rewards, group_size, scale="std", eps=1e-6, std="population"):
    """Triton group advantages; same contract as reference.group_advantages."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    if std not in ("population", "sample"):
        raise ValueError(f"std must be 'population' or 'sample', got {std!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scale == "std" and std == "sample" and group_size == 1:
        raise ValueError("the sample std of a group of one answer is undefined (see AdvantageOptions.singleton)")
    r = rewards.contiguous().view(-1)
    out = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    groups = r.numel() // group_size
    if groups:
        _group_adv_kernel[(groups,)](r, out, group_size, float(eps), USE_STD=scale == "std",
                                    SAMPLE_STD=std == "sample", BLOCK_G=triton.next_power_of_2(group_size))
    return out
