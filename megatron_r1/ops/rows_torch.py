"""Per-row log-softmax statistics and gradients in plain torch, written for CPU speed.

A chunk of logits x [c, V] is the only large buffer: every pass transforms it in place, so the only other
[c, V] allocation is one exp() buffer, and only when the entropy is asked for.
"""
import torch

from .chunked import _zeros_like_or


def _target_index(tokens, vocab_start, v_local):
    local = tokens.long() - vocab_start
    in_shard = (local >= 0) & (local < v_local)
    return local.clamp(0, v_local - 1), in_shard


def _add_onehot_(g, idx, in_shard, value):
    g.scatter_add_(1, idx[:, None], torch.where(in_shard, value, torch.zeros_like(value))[:, None])
    return g


class TorchRows:
    """Row primitives used by the chunk driver in chunked.py; `stats_` overwrites x with its own state."""

    name = "torch"
    stats_clobbers_input = True

    def stats_(self, x, tokens, vocab_start, inv_temp, want_ent):
        """Local (lse, target logit, E[z] or None) of z = x·inv_temp; leaves x as state for grad_after_stats_."""
        if inv_temp != 1.0:
            x.mul_(inv_temp)
        idx, in_shard = _target_index(tokens, vocab_start, x.shape[1])
        tgt = torch.where(in_shard, x.gather(1, idx[:, None])[:, 0], torch.zeros((), device=x.device))
        m = x.amax(1)
        if not want_ent:
            # one cache-friendly row kernel instead of separate sub/exp/sum passes over memory; the largest
            # probability is exactly 1/Σexp(z − m), so lse = m − log max p needs no extra buffer
            torch._softmax(x, 1, False, out=x)
            lse_l = m - torch.log(x.amax(1))
            return lse_l, tgt, in_shard, None, ("softmax", lse_l, None)
        x.sub_(m[:, None])
        e = torch.exp(x)
        s = e.sum(1)
        # batched dot products: E[z − m] without another [c, V] temporary
        ez = torch.bmm(e[:, None, :], x[:, :, None])[:, 0, 0] / s + m
        return m + torch.log(s), tgt, in_shard, ez, ("shifted", m, e)

    def grad_after_stats_(self, x, state, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent):
        """dL/dx in place of x, after stats_ left there the local softmax (or z − m, with exp(z − m) aside)."""
        kind, a, e = state
        g_lp = _zeros_like_or(g_lp, lse)
        if kind == "softmax":
            # local softmax · exp(lse_local − lse) is the softmax over the whole (TP-sharded) vocabulary
            x.mul_((-g_lp * torch.exp(a - lse) * inv_temp)[:, None])
        else:
            # x holds z − m; log p = x − (lse − m); dH/dz = −p (log p + H)
            m = a
            g_ent = _zeros_like_or(g_ent, lse)
            x.add_((ent - (lse - m))[:, None]).mul_(g_ent[:, None]).add_(g_lp[:, None])
            x.mul_(e).mul_((-torch.exp(m - lse) * inv_temp)[:, None])
        idx, in_shard = _target_index(tokens, vocab_start, x.shape[1])
        return _add_onehot_(x, idx, in_shard, g_lp * inv_temp)

    def grad_from_logits(self, x, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent, out):
        """dL/dx into `out` from raw logits x (fp32, scratch) and the global lse / entropy."""
        g_lp = _zeros_like_or(g_lp, lse)
        x.mul_(inv_temp).sub_(lse[:, None])  # log p
        if g_ent is None:
            x.exp_().mul_((-g_lp * inv_temp)[:, None])
        else:
            e = torch.exp(x)
            x.add_(ent[:, None]).mul_(g_ent.float()[:, None]).add_(g_lp[:, None]).mul_(e).mul_(-inv_temp)
        idx, in_shard = _target_index(tokens, vocab_start, x.shape[1])
        _add_onehot_(x, idx, in_shard, g_lp * inv_temp)
        if out is not x:
            out.copy_(x)
        return out
