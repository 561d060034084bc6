"""A functional, KV-cached forward over the parameters of a Megatron-Core GPTModel (this rank's shard).

Why not call GPTModel itself: its forward recomputes the whole sequence (or needs Megatron's inference context,
which assumes CUDA), and its per-module Python layers cost more than the model on tiny CPU shapes. This forward
reads the very `nn.Parameter` objects the trainer updates (no copy, looked up at call time, so Megatron's DDP
re-pointing `param.data` into its buffers is seen too) and reproduces Megatron's arithmetic op for op: RMSNorm,
SwiGLU, grouped QKV layout, RoPE (YaRN with mscale, MLA's de-interleaved rope), MLA with q/kv compression, the
sigmoid group-limited router with expert bias, routed scaling and shared experts.

Tensor parallelism: each rank runs on its shard of heads / FFN columns / vocab rows; row-parallel outputs are
all-reduced over the TP group, the vocab-parallel logits all-gathered, exactly where Megatron does it.
Expert parallelism: tokens are replicated on every rank during generation, so each rank adds its local experts'
weighted outputs and the routed output is all-reduced over the expert (tensor-and-model) group.
Pipeline parallelism is not supported for generation (a clear error at construction).

Caches (one slot row per running request, rows 0..n-1 kept contiguous by the scheduler):
- MLA: the normalised compressed latent c_kv and the roped shared key k_pe, [slots, seq, kv_lora_rank + rope]
  — DeepSeek-V3's memory saving. Decode absorbs W_UK into the query and W_UV into the output, so the cache is
  never expanded (`mla_absorb=False` up-projects the cached latent instead; both are tested).
- Dense (Llama/Qwen2): K and V, [slots, kv_heads, seq, head_dim].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_r1.errors import ConfigError
from megatron_r1.models.local_layers import RMSNorm


# ----------------------------------------------------------------------------------------------- collectives
def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _group_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


def _all_gather_last(x: torch.Tensor, group) -> torch.Tensor:
    n = _group_size(group)
    if n == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


def _linear_gather(x, weight, full_out: int, group):
    """A ColumnParallelLinear whose full output every rank needs (MLA's down projections at TP > 1)."""
    y = F.linear(x, weight)
    return y if weight.shape[0] == full_out else _all_gather_last(y, group)


# ----------------------------------------------------------------------------------------------- cache
@dataclass
class CacheSpec:
    """Shape of one layer's cache entry (for memory accounting and allocation)."""

    mla: bool
    width: int  # MLA: kv_lora_rank + rope dims; dense: head_dim
    kv_heads: int  # dense: this rank's KV heads; MLA: 1


class KVCache:
    """Preallocated per-layer cache pool: `max_batch` slot rows of `max_seq` positions."""

    def __init__(self, num_layers: int, spec: CacheSpec, max_batch: int, max_seq: int, dtype, device):
        self.spec, self.max_batch, self.max_seq = spec, max_batch, max_seq
        if spec.mla:
            self.latent = [torch.zeros(max_batch, max_seq, spec.width, dtype=dtype, device=device)
                           for _ in range(num_layers)]
            self.k = self.v = None
        else:
            shape = (max_batch, spec.kv_heads, max_seq, spec.width)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.latent = None

    def nbytes(self) -> int:
        tensors = self.latent if self.spec.mla else self.k + self.v
        return sum(t.numel() * t.element_size() for t in tensors)

    def bytes_per_token(self) -> int:
        return self.nbytes() // (self.max_batch * self.max_seq)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slot row `src` into `dst` (the scheduler keeps running requests in rows 0..n-1)."""
        if self.spec.mla:
            for t in self.latent:
                t[dst, :length] = t[src, :length]
        else:
            for t in self.k + self.v:
                t[dst, :, :length] = t[src, :, :length]


# ----------------------------------------------------------------------------------------------- model
class FunctionalGPT:
    """KV-cached forward over a GPTModel's parameters; see the module docstring."""

    def __init__(self, model, max_seq: Optional[int] = None, mla_absorb: bool = True):
        from megatron.core import parallel_state as ps

        self.model = model
        cfg = model.config
        self.cfg = cfg
        if ps.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            raise ConfigError("inference: pipeline parallelism is not supported for generation; "
                              "run the engine with pipeline_model_parallel_size=1 (TP and EP are supported)")
        if getattr(model, "mtp_process", False) or getattr(cfg, "mtp_num_layers", None):
            # MTP heads only add a training loss; generation uses the main head (speculative MTP is not done).
            pass
        self.tp_group = ps.get_tensor_model_parallel_group() if ps.is_initialized() else None
        self.tp_size = _group_size(self.tp_group)
        self.tp_rank = dist.get_rank(self.tp_group) if self.tp_size > 1 else 0
        self.expert_group = (ps.get_expert_tensor_and_model_parallel_group()
                             if ps.is_initialized() and cfg.num_moe_experts else None)
        self.mla = bool(getattr(cfg, "multi_latent_attention", False))
        self.mla_absorb = mla_absorb
        self.layers = list(model.decoder.layers)
        self.max_seq = int(max_seq or model.max_sequence_length)
        self.vocab_size = model.vocab_size  # padded; logits cover the padded vocab like the trainer's log-probs
        self.num_layers = len(self.layers)
        attn0 = self.layers[0].self_attention
        if self.mla:
            self.heads = attn0.num_attention_heads_per_partition
            self.dn, self.dr, self.dv = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
            self.c = cfg.kv_lora_rank
            self.softmax_scale = attn0.softmax_scale
            freqs, mscale = attn0.rotary_pos_emb(self.max_seq)
            freqs = freqs.reshape(self.max_seq, -1).float()
            self.cos, self.sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
            self.cache_spec = CacheSpec(True, self.c + self.dr, 1)
        else:
            self.heads = attn0.num_attention_heads_per_partition
            self.kv_heads = attn0.num_query_groups_per_partition
            self.hd = attn0.hidden_size_per_attention_head
            if cfg.num_query_groups is not None and cfg.num_query_groups < self.tp_size:
                raise ConfigError("inference: fewer query groups than TP ranks is not supported for generation")
            self.softmax_scale = 1.0 / math.sqrt(self.hd)
            freqs = model.rotary_pos_emb(self.max_seq)
            freqs = freqs.reshape(self.max_seq, -1).float()
            self.cos, self.sin = torch.cos(freqs), torch.sin(freqs)
            self.cache_spec = CacheSpec(False, self.hd, self.kv_heads)
        self.dtype = model.embedding.word_embeddings.weight.dtype
        self.cos, self.sin = self.cos.to(self.dtype), self.sin.to(self.dtype)

    # ---------------------------------------------------------------------------------- pieces
    def new_cache(self, max_batch: int, device=None) -> KVCache:
        device = device or self.model.embedding.word_embeddings.weight.device
        return KVCache(self.num_layers, self.cache_spec, max_batch, self.max_seq, self.dtype, device)

    def _embed(self, tokens):
        w = self.model.embedding.word_embeddings.weight
        if self.tp_size == 1:
            return F.embedding(tokens, w)
        start = self.tp_rank * w.shape[0]
        local = tokens - start
        outside = (local < 0) | (local >= w.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), w)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return _all_reduce(x, self.tp_group)

    def _norm(self, mod, x):
        # torch's fused rms_norm equals our RMSNorm module in fp32; other dtypes/modules run the module itself
        if type(mod) is RMSNorm and x.dtype == torch.float32 and mod.weight.dtype == torch.float32:
            return F.rms_norm(x, mod.weight.shape, mod.weight, mod.eps)
        return mod(x)

    def _logits(self, h):
        m = self.model
        w = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else m.output_layer.weight
        return _all_gather_last(F.linear(h, w), self.tp_group)

    def _tables(self, pos):
        """cos/sin rows [B, T, 1, d] for positions pos [B, T]: gathered once per forward, shared by all layers."""
        return self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)

    def _rope(self, x, rope, deinterleave: bool):
        """Megatron's non-fused RoPE on x [B, T, heads, d] with the step's tables `rope` = (cos, sin)."""
        if deinterleave:  # MLA: rope dims arrive interleaved (x0, x1, x2, ...) and are regrouped first
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        cos, sin = rope
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def _mlp(self, mlp, x):
        h = F.linear(x, mlp.linear_fc1.weight)
        g, u = h.chunk(2, dim=-1)
        return _all_reduce(F.linear(F.silu(g) * u, mlp.linear_fc2.weight), self.tp_group)

    def _moe(self, moe, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        cfg = self.cfg
        router = moe.router
        logits = F.linear(x.float(), router.weight.float())
        k, n_exp = cfg.moe_router_topk, cfg.num_moe_experts
        if cfg.moe_router_score_function == "sigmoid":
            scores = torch.sigmoid(logits)
            sel = scores + router.expert_bias if router.expert_bias is not None else scores
        else:
            scores = sel = logits  # softmax after top-k (moe_router_pre_softmax=False)
        if cfg.moe_router_group_topk:
            ng = cfg.moe_router_num_groups
            gs = sel.view(-1, ng, n_exp // ng).topk(k // cfg.moe_router_group_topk, dim=-1)[0].sum(-1)
            gidx = gs.topk(cfg.moe_router_group_topk, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
            emask = gmask.unsqueeze(-1).expand(-1, ng, n_exp // ng).reshape(-1, n_exp)
            sel = sel.masked_fill(emask == 0, float("-inf"))
        top_idx = sel.topk(k, dim=-1)[1]
        probs = torch.gather(scores, 1, top_idx)
        if cfg.moe_router_score_function == "sigmoid":
            if k > 1:
                probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        else:
            probs = torch.softmax(probs, dim=-1)
        if cfg.moe_router_topk_scaling_factor:
            probs = probs * cfg.moe_router_topk_scaling_factor
        probs = probs.to(x.dtype)
        out = torch.zeros_like(x)
        for local_i, expert in enumerate(moe.experts.local_experts):
            e = moe.local_expert_indices[local_i]
            hit = top_idx == e
            rows = hit.any(-1).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            p = (probs * hit).sum(-1)[rows]
            h = F.linear(x[rows], expert.linear_fc1.weight)
            g, u = h.chunk(2, dim=-1)
            # Megatron scales the activation by the routing prob before fc2 (same rounding order)
            y = F.linear(F.silu(g) * u * p.unsqueeze(-1), expert.linear_fc2.weight)
            out.index_add_(0, rows, y)
        out = _all_reduce(out, self.expert_group)
        if moe.shared_experts is not None:
            out = out + self._mlp(moe.shared_experts, x)
        return out.reshape(shape)

    def _ffn(self, layer, x):
        mlp = layer.mlp
        return self._moe(mlp, x) if hasattr(mlp, "router") else self._mlp(mlp, x)

    # ---------------------------------------------------------------------------------- attention
    def _mla_project(self, attn, x, rope):
        """q [B,T,H,dn+dr] (roped) and the cache entry cat(c_kv, k_pe) [B,T,c+dr] for hidden x [B,T,h]."""
        cfg = self.cfg
        if cfg.q_lora_rank is not None:
            qc = _linear_gather(x, attn.linear_q_down_proj.weight, cfg.q_lora_rank, self.tp_group)
            q = F.linear(attn.q_layernorm(qc), attn.linear_q_up_proj.weight)
        else:
            q = F.linear(x, attn.linear_q_proj.weight)
        q = q.view(*q.shape[:-1], self.heads, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q = torch.cat([q_nope, self._rope(q_pe, rope, True)], dim=-1)
        kv = _linear_gather(x, attn.linear_kv_down_proj.weight, self.c + self.dr, self.tp_group)
        c, k_pe = kv.split([self.c, self.dr], dim=-1)
        c = attn.kv_layernorm(c)
        k_pe = self._rope(k_pe.unsqueeze(-2), rope, True).squeeze(-2)
        return q, torch.cat([c, k_pe], dim=-1)

    def _mla_expand(self, attn, latent):
        """Expanded K [B,L,H,dn+dr] and V [B,L,H,dv] from cache entries [B,L,c+dr] (Megatron's layout)."""
        c, k_pe = latent.split([self.c, self.dr], dim=-1)
        kv = F.linear(c, attn.linear_kv_up_proj.weight).view(*c.shape[:-1], self.heads, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(-2).expand(*k_pe.shape[:-1], self.heads, self.dr)], dim=-1)
        return k, v

    def _attend(self, q, k, v, mask):
        """q [B,H,Tq,d], k/v [B,H or kv_heads,L,d/dv], mask [B,1,Tq,L] True = attend -> [B,Tq,H*dv].

        torch's fused SDPA (flash kernel on CPU too): ~3x faster than matmul + softmax for prefill, and grouped
        KV heads (query head h reads KV head h // g, Megatron's layout) need no repeat."""
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.softmax_scale,
                                           enable_gqa=k.shape[1] != q.shape[1])
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)

    def _attention_full(self, i, attn, x, rope, mask, cache, row0):
        """Attention over the tokens of x only (prefill); writes their cache entries at rows row0.."""
        B, T, _ = x.shape
        if self.mla:
            q, lat = self._mla_project(attn, x, rope)
            if cache is not None:
                cache.latent[i][row0:row0 + B, :T] = lat
            k, v = self._mla_expand(attn, lat)
            o = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        else:
            q, k, v = self._dense_qkv(attn, x, rope)  # q [B, kv_heads, g*T, d] (grouped), k/v [B, kv_heads, T, d]
            if cache is not None:
                cache.k[i][row0:row0 + B, :, :T] = k
                cache.v[i][row0:row0 + B, :, :T] = v
            o = self._attend(q.reshape(B, self.heads, T, self.hd), k, v, mask)
        return _all_reduce(F.linear(o, attn.linear_proj.weight), self.tp_group)

    def _dense_qkv(self, attn, x, rope):
        """Megatron's grouped QKV layout -> q [B, kv_heads, g, T, hd] flattened as [B, kv_heads, g*T, hd]."""
        B, T, _ = x.shape
        g = self.heads // self.kv_heads
        qkv = F.linear(x, attn.linear_qkv.weight, attn.linear_qkv.bias)
        qkv = qkv.view(B, T, self.kv_heads, (g + 2) * self.hd)
        qk, v = qkv.split([(g + 1) * self.hd, self.hd], dim=-1)
        # q and k heads take the same rotation: rope them in one pass
        qk = self._rope(qk.reshape(B, T, self.kv_heads * (g + 1), self.hd), rope, False)
        qk = qk.view(B, T, self.kv_heads, (g + 1) * self.hd)
        q, k = qk.split([g * self.hd, self.hd], dim=-1)
        # q heads of group j are j*g .. j*g+g-1: group them so K/V heads need no repeat
        q = q.view(B, T, self.kv_heads, g, self.hd).permute(0, 2, 3, 1, 4).reshape(B, self.kv_heads, g * T, self.hd)
        return q, k.transpose(1, 2), v.transpose(1, 2)

    def _attention_decode(self, i, attn, x, rope, bias, slots, cache, L):
        """One new token per row (rows 0..B-1 of the cache), attending to cache positions < L (bias masks each row).
        x [B, 1, h]; `slots`: flat indices of the new entries in the cache viewed as rows of one entry; the softmax
        scale is folded into the query (one multiply on the smallest tensor)."""
        B = x.shape[0]
        if self.mla:
            q, lat = self._mla_project(attn, x, rope)  # q [B,1,H,dn+dr], lat [B,1,c+dr]
            cache.latent[i].view(-1, lat.shape[-1]).index_copy_(0, slots, lat[:, 0])
            lat_all = cache.latent[i][:B, :L]  # [B, L, c+dr]
            if self.mla_absorb:
                w = attn.linear_kv_up_proj.weight.view(self.heads, self.dn + self.dv, self.c)
                w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # [H, dn, c], [H, dv, c]
                q_nope, q_pe = q[:, 0].split([self.dn, self.dr], dim=-1)  # [B, H, *]
                q_lat = torch.einsum("bhd,hdc->bhc", q_nope, w_uk)
                qa = torch.cat([q_lat, q_pe], dim=-1) * self.softmax_scale  # scores against raw cache entries
                s = torch.baddbmm(bias.unsqueeze(1), qa, lat_all.transpose(1, 2))  # [B, H, L]
                o_lat = torch.bmm(torch.softmax(s, dim=-1), lat_all[..., :self.c])  # [B, H, c]
                o = torch.einsum("bhc,hvc->bhv", o_lat, w_uv).reshape(B, 1, self.heads * self.dv)
            else:
                k, v = self._mla_expand(attn, lat_all)
                mask = (bias == 0).view(B, 1, 1, L)
                o = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        else:
            q, k, v = self._dense_qkv(attn, x, rope)  # q [B, kv_heads, g, hd], k/v [B, kv_heads, 1, hd]
            cache.k[i].view(-1, self.hd).index_copy_(0, slots, k.reshape(-1, self.hd))
            cache.v[i].view(-1, self.hd).index_copy_(0, slots, v.reshape(-1, self.hd))
            s = torch.matmul(q * self.softmax_scale, cache.k[i][:B, :, :L].transpose(-1, -2))
            p = torch.softmax(s + bias.view(B, 1, 1, L), dim=-1)
            # [B, kv_heads, g, hd]: head j*g + h of group j is already in Megatron's head order
            o = torch.matmul(p, cache.v[i][:B, :, :L]).reshape(B, 1, self.heads * self.hd)
        return _all_reduce(F.linear(o, attn.linear_proj.weight), self.tp_group)

    # ---------------------------------------------------------------------------------- entry points
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: Optional[KVCache] = None,
                row0: int = 0, all_logits: bool = False) -> torch.Tensor:
        """Forward right-padded prompts tokens [B, T] with lengths [B]; fill cache rows row0..row0+B-1.

        Returns the logits [B, V] at each row's last prompt token, or [B, T, V] with `all_logits`.
        """
        B, T = tokens.shape
        if T > self.max_seq:
            raise ValueError(f"sequence of {T} tokens exceeds the engine's context of {self.max_seq}")
        pos = torch.arange(T, device=tokens.device).expand(B, T)
        ar = torch.arange(T, device=tokens.device)
        mask = (ar[None, :] <= ar[:, None])[None] & (ar[None, None, :] < lengths[:, None, None])
        mask = mask.unsqueeze(1)  # [B, 1, T, T]
        # A padded query row with no visible key would give NaN; let it see key 0 (its output is discarded).
        mask[:, :, :, 0] = True
        x = self._embed(tokens)
        rope = self._tables(pos)
        for i, layer in enumerate(self.layers):
            x = x + self._attention_full(i, layer.self_attention, self._norm(layer.input_layernorm, x), rope, mask,
                                         cache, row0)
            x = x + self._ffn(layer, self._norm(layer.pre_mlp_layernorm, x))
        if not all_logits:
            x = x[torch.arange(B, device=x.device), lengths - 1]
        return self._logits(self._norm(self.model.decoder.final_layernorm, x))

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step for cache rows 0..B-1: tokens [B] at positions pos [B] -> logits [B, V]."""
        B = tokens.shape[0]
        L = int(pos.max()) + 1
        x = self._embed(tokens)  # [B, h]
        rope = self._tables(pos.unsqueeze(1))
        # additive mask over cache positions, shared by all layers: 0 where visible, -inf past each row's length
        dev = x.device
        bias = torch.zeros(B, L, dtype=x.dtype, device=dev).masked_fill_(
            torch.arange(L, device=dev)[None, :] > pos[:, None], float("-inf"))
        # where each row's new K/V (or latent) goes, as flat row indices into the cache: once per step
        if self.mla:
            slots = torch.arange(B, device=dev) * cache.max_seq + pos
        else:
            heads = torch.arange(self.kv_heads, device=dev)
            slots = ((torch.arange(B, device=dev)[:, None] * self.kv_heads + heads[None, :]) * cache.max_seq + pos[:, None])
            slots = slots.reshape(-1)
        for i, layer in enumerate(self.layers):
            h = self._norm(layer.input_layernorm, x).unsqueeze(1)
            x = x + self._attention_decode(i, layer.self_attention, h, rope, bias, slots, cache, L)[:, 0]
            x = x + self._ffn(layer, self._norm(layer.pre_mlp_layernorm, x))
        return self._logits(self._norm(self.model.decoder.final_layernorm, x))
