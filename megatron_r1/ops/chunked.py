"""Token log-probs and the fused policy loss, chunk by chunk over tokens: never a [T, V] buffer.

One driver serves every backend. A backend ("rows") supplies the per-row work on a [c, V_local] logits chunk:
local log-sum-exp, target logit and E[z] (`stats_`), and the gradient w.r.t. the chunk (`grad_after_stats_`,
`grad_from_logits`). The driver does the matmuls, combines the local statistics across the TP group the way
Megatron's vocab-parallel cross entropy does, and owns autograd.

Two gradient strategies:
- `token_logprobs` returns per-token values whose upstream gradient is unknown in forward, so its backward
  recomputes each chunk's logits (4 matmuls in all).
- `fused_policy_loss` knows the loss, hence each token's upstream gradient, as soon as the chunk's log-probs
  exist: it produces grad_hidden and grad_weight during forward (the 3 matmuls no method avoids) and its
  backward only scales them by the scalar upstream gradient.
"""
import math
import os

import torch

from . import _tp
from .loss import PolicyLossConfig, aggregation_weights, policy_metrics, tis_weights, token_terms
from .reference import policy_loss_from_config

# Bytes of fp32 logits per chunk. Large enough that grad_weight += gᵀ·h amortizes its read-modify-write of
# grad_weight over many tokens, small enough to stay far below the [T, V] buffers naive torch holds.
DEFAULT_CHUNK_BYTES = int(os.environ.get("MEGATRON_R1_OPS_CHUNK_BYTES", 128 * 2**20))


def chunk_rows(t: int, v: int, chunk_tokens=None) -> int:
    """Tokens per chunk: explicit, or as many as fit DEFAULT_CHUNK_BYTES of fp32 logits."""
    if chunk_tokens is None:
        chunk_tokens = DEFAULT_CHUNK_BYTES // (4 * max(v, 1))
    return max(1, min(int(chunk_tokens), max(t, 1)))


def _low_precision_on_cuda(t):
    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def _mm32(a, b):
    """a @ b with an fp32 result; on CUDA half inputs stay half and accumulate in fp32 (mm's out_dtype)."""
    if a.dtype == b.dtype == torch.float32:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype and _low_precision_on_cuda(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _Operands:
    """The weight as the matmuls want it: an fp32 copy on CPU (made once), the original dtype on CUDA."""

    def __init__(self, weight):
        self.dtype = weight.dtype if _low_precision_on_cuda(weight) else torch.float32
        self.w = weight if weight.dtype == self.dtype else weight.to(self.dtype)

    def logits(self, h, inv_temp, buf=None):
        """fp32 logits of a chunk, written into `buf` when given (a [c, V] buffer reused across chunks)."""
        h = h.to(self.dtype)
        if inv_temp != 1.0:
            h = h * inv_temp  # scaling [c, H] is cheaper than scaling [c, V]
        if buf is not None and self.dtype == torch.float32:
            return torch.mm(h, self.w.t(), out=buf[: h.shape[0]])
        return _mm32(h, self.w.t())

    def chunk_buffer(self, c, v, device):
        """One [c, V] fp32 buffer for every chunk: a fresh multi-MB allocation per chunk is page-faulted in
        each time on CPU, which costs as much as a pass over it. CUDA's caching allocator needs none."""
        return torch.empty(c, v, device=device) if self.dtype == torch.float32 and device.type == "cpu" else None

    def grad_hidden_(self, out, gx, inv_temp):
        if self.dtype == torch.float32 and out.dtype == torch.float32:
            torch.mm(gx, self.w, out=out)
        else:
            out.copy_(_mm32(gx.to(self.dtype), self.w))
        if inv_temp != 1.0:
            out.mul_(inv_temp)

    def add_grad_weight_(self, acc, gx, h):
        if acc.dtype == self.dtype == torch.float32:
            acc.addmm_(gx.t(), h.float())
        else:
            acc.add_(_mm32(gx.to(self.dtype).t(), h.to(self.dtype)))

    def chain_(self, grad_h, grad_w, s, e, gx, h, inv_temp):
        """Chain rule through the chunk's logits x = h Wᵀ / T, given dL/dx: rows s:e of dL/dh written, dL/dW
        accumulated (a None buffer is a gradient not wanted)."""
        if grad_h is not None:
            self.grad_hidden_(grad_h[s:e], gx, inv_temp)
        if grad_w is not None:
            self.add_grad_weight_(grad_w, gx, h * inv_temp)


def _grad_buffers(ctx, hidden, weight):
    """fp32 dL/dhidden (every row written) and dL/dweight (accumulated) for the inputs that need a gradient."""
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if ctx.needs_input_grad[0] else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
    return grad_h, grad_w


def combine(lse_l, tgt_l, ez_l, tp_group):
    """Global (lse, target logit, entropy or None) from each rank's statistics over its vocab shard."""
    if _tp.world(tp_group) == 1:
        return lse_l, tgt_l, (lse_l - ez_l) if ez_l is not None else None
    m = _tp.all_reduce_(lse_l.clone(), tp_group, op=torch.distributed.ReduceOp.MAX)
    w = torch.exp(lse_l - m)
    parts = [w, tgt_l] + ([w * ez_l] if ez_l is not None else [])
    packed = _tp.all_reduce_(torch.stack(parts), tp_group)
    lse = m + torch.log(packed[0])
    ent = lse - packed[2] / packed[0] if ez_l is not None else None
    return lse, packed[1], ent


def _chunk_stats(rows, x, tokens, start, inv_temp, want_ent, tp_group):
    lse_l, tgt_l, _, ez_l, state = rows.stats_(x, tokens, start, inv_temp, want_ent)
    lse, tgt, ent = combine(lse_l, tgt_l, ez_l, tp_group)
    return lse, tgt, ent, state


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, want_ent, tp_group, rows, chunk_tokens):
        t = hidden.shape[0]
        ops = _Operands(weight)
        start = _tp.rank(tp_group) * weight.shape[0]
        c = chunk_rows(t, weight.shape[0], chunk_tokens)
        lse = torch.empty(t, device=hidden.device)
        logp = torch.empty(t, device=hidden.device)
        ent = torch.empty(t, device=hidden.device) if want_ent else None
        buf = ops.chunk_buffer(c, weight.shape[0], hidden.device)
        for s in range(0, t, c):
            e = min(s + c, t)
            x = ops.logits(hidden[s:e], 1.0 / temperature, buf)
            lse_c, tgt_c, ent_c, _ = _chunk_stats(rows, x, tokens[s:e], start, 1.0, want_ent, tp_group)
            lse[s:e], logp[s:e] = lse_c, tgt_c - lse_c
            if want_ent:
                ent[s:e] = ent_c
        ctx.save_for_backward(hidden, weight, tokens, lse, ent if want_ent else None)
        ctx.cfg = (temperature, tp_group, rows, c)
        if want_ent:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        hidden, weight, tokens, lse, ent = ctx.saved_tensors
        temperature, tp_group, rows, c = ctx.cfg
        inv_temp = 1.0 / temperature
        ops = _Operands(weight)
        start = _tp.rank(tp_group) * weight.shape[0]
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        t = hidden.shape[0]
        buf = ops.chunk_buffer(c, weight.shape[0], hidden.device)
        for s in range(0, t, c):
            e = min(s + c, t)
            h = hidden[s:e]
            x = ops.logits(h, inv_temp, buf)
            gx = rows.grad_from_logits(
                x, tokens[s:e], start, 1.0, lse[s:e], None if ent is None else ent[s:e],
                None if g_lp is None else g_lp[s:e], None if g_ent is None else g_ent[s:e], x)
            ops.chain_(grad_h, grad_w, s, e, gx, h, inv_temp)
        if grad_h is not None:
            _tp.all_reduce_(grad_h, tp_group)
            grad_h = grad_h.to(hidden.dtype)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


class _LogprobsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, want_ent, tp_group, rows, chunk_tokens):
        t, v = logits.shape
        start = _tp.rank(tp_group) * v
        c = chunk_rows(t, v, chunk_tokens)
        lse = torch.empty(t, device=logits.device)
        logp = torch.empty(t, device=logits.device)
        ent = torch.empty(t, device=logits.device) if want_ent else None
        for s in range(0, t, c):
            e = min(s + c, t)
            x = _scratch(rows, logits[s:e])
            lse_c, tgt_c, ent_c, _ = _chunk_stats(rows, x, tokens[s:e], start, 1.0 / temperature, want_ent,
                                                  tp_group)
            lse[s:e], logp[s:e] = lse_c, tgt_c - lse_c
            if want_ent:
                ent[s:e] = ent_c
        ctx.save_for_backward(logits, tokens, lse, ent)
        ctx.cfg = (temperature, tp_group, rows, c)
        return (logp, ent) if want_ent else logp

    @staticmethod
    def backward(ctx, g_lp, g_ent=None):
        logits, tokens, lse, ent = ctx.saved_tensors
        temperature, tp_group, rows, c = ctx.cfg
        start = _tp.rank(tp_group) * logits.shape[1]
        # row-major whatever the logits' layout: the kernels write rows with unit column stride
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        t = logits.shape[0]
        for s in range(0, t, c):
            e = min(s + c, t)
            rows.grad_from_logits(
                _scratch(rows, logits[s:e]), tokens[s:e], start, 1.0 / temperature, lse[s:e],
                None if ent is None else ent[s:e], None if g_lp is None else g_lp[s:e],
                None if g_ent is None else g_ent[s:e], grad[s:e])
        return grad, None, None, None, None, None, None


def _scratch(rows, x):
    """A chunk the backend may overwrite: a private fp32 copy when it works in place, else the input itself."""
    if rows.stats_clobbers_input:
        # row-major: in-place row kernels (softmax with out=x) assume it
        return torch.empty(x.shape, dtype=torch.float32, device=x.device).copy_(x)
    return x


def token_logprobs(hidden, weight, tokens, temperature=1.0, return_entropy=False, tp_group=None, *, rows,
                   chunk_tokens=None):
    """Chunked token log-probs from hidden states with backend `rows`; see megatron_r1.ops.token_logprobs."""
    _check_temperature(temperature)
    return _TokenLogprobs.apply(hidden, weight, tokens, float(temperature),
                                bool(return_entropy), tp_group, rows, chunk_tokens)


def logprobs_from_logits(logits, tokens, temperature=1.0, return_entropy=False, tp_group=None, *, rows,
                         chunk_tokens=None):
    """Chunked token log-probs from (vocab-parallel) logits with backend `rows`."""
    _check_temperature(temperature)
    return _LogprobsFromLogits.apply(logits, tokens, float(temperature), bool(return_entropy), tp_group, rows,
                                     chunk_tokens)


def _check_temperature(temperature):
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


class _FusedPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, tp_group, rows, chunk_tokens, token_grad, want_ent=False):
        t = hidden.shape[0]
        inv_temp = 1.0 / temperature
        ops = _Operands(weight)
        start = _tp.rank(tp_group) * weight.shape[0]
        c = chunk_rows(t, weight.shape[0], chunk_tokens)
        grad_h, grad_w = _grad_buffers(ctx, hidden, weight)
        logp = torch.empty(t, device=hidden.device)
        ent = torch.empty(t, device=hidden.device) if want_ent else None
        loss = torch.zeros((), device=hidden.device)
        buf = ops.chunk_buffer(c, weight.shape[0], hidden.device)
        for s in range(0, t, c):
            e = min(s + c, t)
            h = hidden[s:e]
            x = ops.logits(h, inv_temp, buf)
            lse_c, tgt_c, ent_c, state = _chunk_stats(rows, x, tokens[s:e], start, 1.0, want_ent, tp_group)
            logp[s:e] = tgt_c - lse_c
            if want_ent:
                ent[s:e] = ent_c
            loss_c, g_c = token_grad(logp[s:e], s, e)
            loss += loss_c
            if grad_h is None and grad_w is None:
                continue
            gx = rows.grad_after_stats_(x, state, tokens[s:e], start, 1.0, lse_c, ent_c, g_c, None)
            ops.chain_(grad_h, grad_w, s, e, gx, h, inv_temp)
        if grad_h is not None:
            _tp.all_reduce_(grad_h, tp_group)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if ent is None:
            ent = torch.empty(0, device=hidden.device)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logp, _g_ent):
        grad_h, grad_w = ctx.saved_tensors
        # in place: the buffers are ours and backward runs once; a copy of grad_w would be weight-sized
        if grad_h is not None:
            grad_h = grad_h.mul_(g_loss).to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = grad_w.mul_(g_loss).to(ctx.dtypes[1])
        return grad_h, grad_w, None, None, None, None, None, None, None


def fused_policy_loss(hidden, weight, tokens, old_logprobs, advantages, mask, cfg: PolicyLossConfig,
                      ref_logprobs=None, behavior_logprobs=None, temperature=1.0, tp_group=None, *, rows,
                      chunk_tokens=None, return_entropy=False):
    """Policy loss straight from hidden states [B, L, H] and tokens [B, L]; returns (loss, metrics), and the
    per-token entropy [B, L] (no gradient) with `return_entropy`.

    Same semantics as policy_loss_from_config(token_logprobs(...), ...), metrics included. Every token-level
    loss (clip, dual_clip, cispo) is fused; a sequence-level ratio (gspo) takes the composed path.
    `old_logprobs=None` means on-policy (old = the log-probs being computed, detached: ratio 1, as a trainer with
    one mini-batch per rollout uses), which the chunked pass can do because each chunk's log-probs are known
    before its gradient.
    """
    _check_temperature(temperature)
    b, l = tokens.shape
    flat_h = hidden.reshape(b * l, hidden.shape[-1])
    flat_tok = tokens.reshape(-1)
    if cfg.sequence_ratio:
        # a sequence ratio couples every token of an answer, so no token's gradient is known chunk by chunk
        out = token_logprobs(flat_h, weight, flat_tok, temperature, return_entropy, tp_group, rows=rows,
                             chunk_tokens=chunk_tokens)
        logp, ent = out if return_entropy else (out, None)
        logp = logp.view(b, l)
        old_logprobs = logp.detach() if old_logprobs is None else old_logprobs
        res = policy_loss_from_config(logp, old_logprobs, advantages, mask, cfg, ref_logprobs, behavior_logprobs)
        return (*res, ent.detach().view(b, l)) if return_entropy else res
    cfg.check_inputs(ref_logprobs, behavior_logprobs)
    mask = mask.bool()
    old = None if old_logprobs is None else old_logprobs.float().reshape(-1)
    adv = advantages.float()[:, None].expand(b, l).reshape(-1)
    m = mask.reshape(-1)
    ref = ref_logprobs.float().reshape(-1) if ref_logprobs is not None else None
    tis = None
    if cfg.tis_cap is not None:
        # known before any log-prob of this pass (it compares old and behaviour log-probs), at either level
        tis = tis_weights(old_logprobs, behavior_logprobs, mask, cfg.tis_cap, cfg.tis_level).reshape(-1)
    w = aggregation_weights(mask, cfg.loss_agg, cfg.max_response_length).reshape(-1)
    zero = torch.zeros((), device=hidden.device)

    def token_grad(logp_c, s, e):
        with torch.enable_grad():
            lp = logp_c.detach().requires_grad_(True)
            mk = m[s:e]
            old_c = lp.detach() if old is None else old[s:e]
            per_token, _, _ = token_terms(torch.where(mk, lp - old_c, zero), adv[s:e], mk, cfg, lp,
                                          None if ref is None else ref[s:e], None if tis is None else tis[s:e])
            total = (torch.where(mk, per_token, zero) * w[s:e]).sum()
            (g,) = torch.autograd.grad(total, lp)
        return total.detach(), g

    loss, logp, ent = _FusedPolicyLoss.apply(flat_h, weight, flat_tok, float(temperature), tp_group, rows,
                                             chunk_tokens, token_grad, bool(return_entropy))
    logp = logp.view(b, l)
    if old_logprobs is None:
        old_logprobs = logp
    with torch.no_grad():
        log_ratio = torch.where(mask, logp - old_logprobs.float(), zero)
        _, ratio, kl = token_terms(log_ratio, advantages.float()[:, None], mask, cfg, logp,
                                   None if ref_logprobs is None else ref_logprobs.float())
        metrics = policy_metrics(ratio, advantages.float()[:, None].expand(b, l), mask, cfg, kl)
    return (loss, metrics, ent.view(b, l)) if return_entropy else (loss, metrics)


def _zeros_like_or(g, like):
    """g as contiguous fp32, or zeros shaped like `like` when autograd passed None."""
    return torch.zeros_like(like, dtype=torch.float32) if g is None else g.float().contiguous()
