"""A functional, KV-cached forward over the parameters of a Megatron-Core GPTModel (this rank's shard).

Why not call GPTModel itself: its forward recomputes the whole sequence (or needs Megatron's inference context,
which assumes CUDA), and its per-module Python layers cost more than the model on tiny CPU shapes. This forward
reads the very `nn.Parameter` objects the trainer updates (no copy; the Parameter objects are held, so Megatron's
DDP re-pointing `param.data` into its buffers is seen too) and reproduces Megatron's arithmetic op for op: RMSNorm,
SwiGLU, grouped QKV layout, RoPE (YaRN with mscale, MLA's de-interleaved rope), MLA with q/kv compression, the
sigmoid group-limited router with expert bias (or a softmax router), routed scaling and shared experts. Every
weight comes through `layer_adapter.read_model`, which knows the local spec's layout and Transformer Engine's
(norms fused into the next linear as `layer_norm_weight`) and refuses, naming the config field or module, what
this forward does not reproduce.

Tensor parallelism: each rank runs on its shard of heads / FFN columns / vocab rows; row-parallel outputs are
all-reduced over the TP group, the vocab-parallel logits all-gathered, exactly where Megatron does it.
Expert parallelism: tokens are replicated on every rank during generation, so each rank adds its local experts'
weighted outputs and the routed output is all-reduced over the expert (tensor-and-model) group.
Pipeline parallelism: each stage runs its own layers. The first stage embeds the tokens, every stage but the last
sends its output hidden states to the next stage (point to point on the pipeline group: NCCL on GPUs, gloo on the
CPU) and every stage but the first receives its input from the previous one; only the last stage applies the
final norm and the output layer, so `prefill`/`decode` return logits there and None elsewhere (the engine samples
on the last stage and broadcasts the tokens). Shapes are known on every stage without a handshake: the engine's
schedule is the same on every rank, so each stage knows the batch it is about to receive.

Caches (one slot row per running request, rows 0..n-1 kept contiguous by the scheduler):
- MLA: the normalised compressed latent c_kv and the roped shared key k_pe, [slots, seq, kv_lora_rank + rope]
  — DeepSeek-V3's memory saving. Decode absorbs W_UK into the query and W_UV into the output, so the cache is
  never expanded (`mla_absorb=False` up-projects the cached latent instead; both are tested).
- Dense (Llama/Qwen2): K and V side by side, [slots, kv_heads, seq, 2 * head_dim] (`k` / `v` are views), so a
  decode step writes a token's K and V with one `index_copy_` straight from the QKV projection's output.
  The engine's contiguous cache grows its slots and positions with the requests (`KVCache(grow=True)`).
- Paged (`paged_cache.PagedKVCache`, the engine's default off the fused CPU path): the same entries in
  fixed-size blocks from one pool, a block table per row, prompt blocks shared by the G answers of a prompt.
  The forward reaches either cache through the same hooks (`begin_prefill`, `write_prefill`, `decode_index`,
  `read`), so the arithmetic is the same op for op.
Each cache also keeps an additive attention bias per slot row (0 up to the row's length, -inf beyond), updated
with one scatter per decode step instead of rebuilding a mask.

Why the decode step is written the way it is: at small shapes (and on CPU) a step costs what its ops dispatch,
not what its matmuls compute, so it runs the fewest torch calls that keep Megatron's arithmetic: parameters
looked up once per layer (`refresh()`), RoPE as one multiply-add on q and k together (the softmax scale folded
into the query's tables), K/V written in place, residual adds fused into the output projections (TP = 1).
Prefill runs the last layer's attention output and MLP only at each row's last prompt token, the only one
whose logits are needed (every layer's K/V are still cached for the whole prompt).

On the CPU, a dense fp32 model without TP or PP decodes through the fused step of csrc/cpu_decode.cpp instead (one
extension call per step, same arithmetic, on contiguous rows or walking a paged cache's block table in place of
the torch path's block gather; `fused_decode_reason()` says when it does not apply, and a missing compiler or
`MEGATRON_R1_CPU_DECODE=0` leaves the torch ops below in charge).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_r1.errors import ConfigError
from megatron_r1.inference import cpu_kernels, layer_adapter
from megatron_r1.inference.paged_cache import PagedKVCache
from megatron_r1.models.local_layers import rms_norm

_NO_TABLE = torch.empty(0, dtype=torch.long)  # the fused step's block table for a contiguous cache


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


def _pp_send(x: torch.Tensor, group) -> None:
    """Hidden states to the next pipeline stage (Megatron's next-rank convention, no wrap-around)."""
    from megatron.core import parallel_state as ps

    dist.send(x.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank(), group=group)


def _pp_recv(shape, dtype, device, group) -> torch.Tensor:
    """Hidden states of `shape` from the previous pipeline stage."""
    from megatron.core import parallel_state as ps

    x = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(x, src=ps.get_pipeline_model_parallel_prev_rank(), group=group)
    return x


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
    """Per-layer cache pool of slot rows x positions, plus each row's bias.

    Preallocated (`grow=False`): `max_batch` rows of `max_seq` positions from the start. Growing (`grow=True`, the
    engine's): it starts empty and `reserve(rows, seq)` reallocates (copying what is cached) when a step needs more
    rows or positions than it holds, rounded up to a power of two (positions: at least `MIN_SEQ`) and never past
    `max_batch` x `max_seq`; `reserve(0, 0)` frees it. Why: at a long context (SmolLM2's 8192 positions, 32 slots,
    46 KB a token: 12 GB) the preallocated rows are almost all empty; sized from the requests the cache holds what
    they can reach, and the fused CPU decode step, which reads any [rows, kv_heads, seq, 2 * hd] layout, still runs.
    Reallocation changes the tensors' addresses (`version` counts them: CUDA graphs captured on the old ones are
    dropped, see cuda_graphs.py)."""

    MIN_SEQ = 64  # smallest position capacity of a growing cache (the CUDA-graph length buckets start there too)

    def __init__(self, num_layers: int, spec: CacheSpec, max_batch: int, max_seq: int, dtype, device,
                 grow: bool = False):
        self.spec, self.max_batch, self.max_seq = spec, max_batch, max_seq
        self.num_layers, self.dtype, self.device, self.grow = num_layers, dtype, torch.device(device), bool(grow)
        self.version = 0
        self.rows_cap = self.seq_cap = 0
        self.latent: Optional[list[torch.Tensor]] = None
        self.kv: Optional[list[torch.Tensor]] = None
        if self.grow:
            self._allocate(0, 0)
        else:
            self._allocate(max_batch, max_seq)

    def _allocate(self, rows: int, seq: int) -> None:
        """Tensors of `rows` x `seq`, holding the old contents where they overlap."""
        spec, device, dtype = self.spec, self.device, self.dtype
        old, old_bias = (self._tensors(), self.bias) if self.version else (None, None)
        r, s = min(rows, self.rows_cap), min(seq, self.seq_cap)
        if spec.mla:
            self.latent = [torch.zeros(rows, seq, spec.width, dtype=dtype, device=device)
                           for _ in range(self.num_layers)]
            self.kv = self.k = self.v = None
            self.slot_base = torch.arange(rows, device=device) * seq  # flat index of (row, 0) in [rows * seq, w]
        else:
            shape = (rows, spec.kv_heads, seq, 2 * spec.width)
            self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
            self.k = [t[..., :spec.width] for t in self.kv]
            self.v = [t[..., spec.width:] for t in self.kv]
            self.latent = None
            heads = torch.arange(spec.kv_heads, device=device)
            rows_t = torch.arange(rows, device=device)
            self.slot_base = (rows_t[:, None] * spec.kv_heads + heads[None, :]) * seq  # (row, head, 0), flat
        # additive attention bias: 0 at a row's cached positions, -inf beyond (shared by every layer)
        self.bias = torch.full((rows, seq), float("-inf"), dtype=dtype, device=device)
        if old is not None and r and s:
            for t, o in zip(self._tensors(), old):
                if spec.mla:
                    t[:r, :s] = o[:r, :s]
                else:
                    t[:r, :, :s] = o[:r, :, :s]
            self.bias[:r, :s] = old_bias[:r, :s]
        self.rows_cap, self.seq_cap = rows, seq
        self.version += 1

    def rounded(self, rows: int, seq: int) -> tuple[int, int]:
        """The (rows, positions) a growing cache allocates for `rows` rows of up to `seq` positions."""
        if rows > self.max_batch or seq > self.max_seq:
            raise ValueError(f"{rows} rows of {seq} positions exceed the cache's {self.max_batch} x {self.max_seq}")
        if rows <= 0 or seq <= 0:
            return 0, 0
        return (min(1 << (rows - 1).bit_length(), self.max_batch),
                min(max(1 << (seq - 1).bit_length(), self.MIN_SEQ), self.max_seq))

    def bytes_for(self, rows: int, seq: int) -> int:
        """Bytes of K/V (or latents) a growing cache holds for `rows` rows of up to `seq` positions."""
        r, s = self.rounded(rows, seq)
        return r * s * self.bytes_per_token()

    def reserve(self, rows: int, seq: int) -> bool:
        """Make rows 0..rows-1 hold positions 0..seq-1 (rows and positions beyond may be dropped: the caller
        names everything that is cached). Reallocates only when they do not fit, or, for (0, 0), to free the
        cache; True when it did. A preallocated cache always fits."""
        if not self.grow:
            if rows > self.max_batch or seq > self.max_seq:
                raise ValueError(f"{rows} rows of {seq} positions exceed the cache's {self.max_batch} x {self.max_seq}")
            return False
        if rows == 0 and seq == 0:
            if not self.rows_cap:
                return False
            self._allocate(0, 0)
            return True
        if rows <= self.rows_cap and seq <= self.seq_cap:
            return False
        self._allocate(*self.rounded(rows, seq))
        return True

    paged = False

    def _tensors(self) -> list[torch.Tensor]:
        return self.latent if self.spec.mla else self.kv

    # the hooks the forward calls, shared with paged_cache.PagedKVCache (which stores entries in blocks)
    def begin_prefill(self, row0: int, B: int, T: int) -> None:
        """Nothing to prepare: rows are contiguous."""

    def write_prefill(self, i: int, row0: int, lat=None, k=None, v=None) -> None:
        """Store a prefill's entries: MLA lat [B, T, w]; dense k, v [B, kv_heads, T, hd]."""
        if self.spec.mla:
            self.latent[i][row0:row0 + lat.shape[0], :lat.shape[1]] = lat
        else:
            self.k[i][row0:row0 + k.shape[0], :, :k.shape[2]] = k
            self.v[i][row0:row0 + v.shape[0], :, :v.shape[2]] = v

    def decode_index(self, B: int, pos: torch.Tensor, L: int):
        """(flat slots of the new entries at positions pos [B] of rows 0..B-1, nothing to gather)."""
        if self.spec.mla:
            return self.slot_base[:B] + pos, None
        return (self.slot_base[:B] + pos[:, None]).view(-1), None

    def read(self, i: int, B: int, L: int, table=None) -> torch.Tensor:
        """Rows 0..B-1's first L entries (a view): MLA [B, L, w]; dense [B, kv_heads, L, 2*hd]."""
        return self.latent[i][:B, :L] if self.spec.mla else self.kv[i][:B, :, :L]

    def release_row(self, row: int) -> None:
        """Nothing to free: a row's positions are its own."""

    def release_all(self) -> None:
        """Nothing to free."""

    def sync(self) -> None:
        """No block table."""

    def nbytes(self) -> int:
        """Bytes of cached K/V (or latents); the small per-row bias is not counted."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def bytes_per_token(self) -> int:
        """Cache bytes of one token over all layers."""
        per_layer = self.spec.width if self.spec.mla else 2 * self.spec.kv_heads * self.spec.width
        return self.num_layers * per_layer * torch.empty((), dtype=self.dtype).element_size()

    def set_lengths(self, row0: int, lengths: torch.Tensor) -> None:
        """Rows row0.. now hold `lengths` cached positions each (after a prefill)."""
        visible = torch.arange(self.seq_cap, device=lengths.device)[None, :] < lengths[:, None]
        self.bias[row0:row0 + lengths.shape[0]].zero_().masked_fill_(~visible, float("-inf"))

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy slot row `src` into `dst` (the scheduler keeps running requests in rows 0..n-1)."""
        self.copy_rows(src, dst, length)

    def copy_rows(self, src, dst, length: int) -> None:
        """Slot rows `dst` get the first `length` positions (and the bias) of rows `src` (ints or index tensors):
        a prompt prefilled once serves several requests (GRPO's G samples of one prompt)."""
        for t in self._tensors():
            if self.spec.mla:  # [rows, seq, width]
                t[dst, :length] = t[src, :length]
            else:  # [rows, kv_heads, seq, 2 * head_dim]
                t[dst, :, :length] = t[src, :, :length]
        self.bias[dst] = self.bias[src]


# ----------------------------------------------------------------------------------------------- model
class _Layer:
    """One decoder layer's parameters as the functional forward uses them, read once through
    `layer_adapter.read_model` (either spec's layout): nn.Module attribute lookups cost more than the ops at decode
    shapes. Parameters are held, not copied, so in-place updates (an optimizer step, DDP's re-pointed `.data`)
    are seen; `FunctionalGPT.refresh()` rebuilds these after modules are replaced."""

    def __init__(self, rec: layer_adapter.Layer, dtype):
        self.rec = rec
        self.in_norm = _norm_fn(rec.in_norm, dtype)
        self.mlp_norm = _norm_fn(rec.mlp_norm, dtype)
        self.proj_w = rec.attn.proj_w
        self.moe = rec.mlp if isinstance(rec.mlp, layer_adapter.MoE) else None  # router, experts, shared expert
        self.fc1_w = self.fc2_w = None
        if self.moe is None:
            self.fc1_w, self.fc2_w = rec.mlp.fc1_w, rec.mlp.fc2_w
        if isinstance(rec.attn, layer_adapter.DenseAttention):
            self.qkv_w, self.qkv_b = rec.attn.qkv_w, rec.attn.qkv_b
        else:  # MLA
            self.mla = rec.attn
            self.q_norm = _norm_fn(rec.attn.q_norm, dtype)
            self.kv_norm = _norm_fn(rec.attn.kv_norm, dtype)


def _identity(x):
    return x


def _norm_fn(norm: Optional[layer_adapter.Norm], dtype):
    """x -> RMSNorm(x) for the adapter's `Norm` (None: identity). In fp32 as x * rsqrt(|x|^2 / d + eps) * w in
    three small ops plus two multiplies (torch's rms_norm runs eight on CPU, and norms were the costliest
    non-matmul op of a decode step); equal to `local_layers.rms_norm` up to rounding, which runs otherwise."""
    if norm is None:
        return _identity
    w, eps = norm.weight, norm.eps
    if dtype == torch.float32 and w.dtype == torch.float32:
        eps_t = torch.tensor(eps, dtype=torch.float32, device=w.device)
        inv_d = 1.0 / w.shape[0]
        vector_norm, addcmul, rsqrt, mul = torch.linalg.vector_norm, torch.addcmul, torch.rsqrt, torch.mul

        def fp32_rms_norm(x):
            n = vector_norm(x, 2, -1, True)
            return mul(x, rsqrt(addcmul(eps_t, n, n, value=inv_d))).mul_(w)
        return fp32_rms_norm
    return lambda x: rms_norm(x, w, eps)


class FunctionalGPT:
    """KV-cached forward over a GPTModel's parameters; see the module docstring."""

    def __init__(self, model, max_seq: Optional[int] = None, mla_absorb: bool = True, use_fused: bool = True):
        """`use_fused`: run decode steps through the fused CPU step where it applies (`fused_decode_reason`)."""
        from megatron.core import parallel_state as ps

        self.model = model
        cfg = model.config
        self.cfg = cfg
        # this rank's pipeline stage: the first embeds, the last normalises and projects to the vocabulary
        self.pp_size = ps.get_pipeline_model_parallel_world_size() if ps.is_initialized() else 1
        self.pp_group = ps.get_pipeline_model_parallel_group() if self.pp_size > 1 else None
        self.first_stage = bool(getattr(model, "pre_process", True))
        self.last_stage = bool(getattr(model, "post_process", True))
        if not len(model.decoder.layers):
            raise ConfigError("inference: a pipeline stage without decoder layers is not supported for generation "
                              "(parallel.num_layers_in_first/last_pipeline_stage: give every stage a layer)")
        # Every module and config field this forward reproduces is checked here (ConfigError naming it otherwise),
        # for the local spec's layout and Transformer Engine's alike. MTP heads (cfg.mtp_num_layers) only add a
        # training loss; generation uses the main head.
        layer_adapter.read_model(model)
        self.tp_group = ps.get_tensor_model_parallel_group() if ps.is_initialized() else None
        self.tp_size = _group_size(self.tp_group)
        self.tp_rank = dist.get_rank(self.tp_group) if self.tp_size > 1 else 0
        self.expert_group = (ps.get_expert_tensor_and_model_parallel_group()
                             if ps.is_initialized() and cfg.num_moe_experts else None)
        self.mla = bool(getattr(cfg, "multi_latent_attention", False))
        self.mla_absorb = mla_absorb
        self.use_fused = use_fused
        self.max_seq = int(max_seq or model.max_sequence_length)
        # Routing record (router replay, rl.router_replay): with `record_routing`, every prefill / decode leaves
        # the top-k expert ids its MoE layers chose in `last_routing`, int16 [B, T, moe layers, k] (prefill) or
        # [B, moe layers, k] (decode), layers in `routing_layers` order. Recording prefills the last layer over
        # every prompt token (not only the last one), since the trainer's forward routes them all.
        self.record_routing = False
        self.last_routing: Optional[torch.Tensor] = None
        self._routing: Optional[list] = None
        self.vocab_size = model.vocab_size  # padded; logits cover the padded vocab like the trainer's log-probs
        self.num_layers = len(model.decoder.layers)  # this stage's
        self.hidden_size = cfg.hidden_size
        attn0 = model.decoder.layers[0].self_attention
        # the compute dtype: the embedding's, or (a later pipeline stage has none) the first projection's
        self.dtype = (model.embedding.word_embeddings.weight if self.first_stage else attn0.linear_proj.weight).dtype
        self.heads = attn0.num_attention_heads_per_partition
        if self.mla:
            self.dn, self.dr, self.dv = cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim
            self.c = cfg.kv_lora_rank
            self.softmax_scale = attn0.softmax_scale
            emb = attn0.rotary_pos_emb(self.max_seq)
            # YaRN returns (freqs, mscale); plain RoPE (rope_type="rope") the freqs alone, applied unscaled
            freqs, mscale = emb if isinstance(emb, tuple) else (emb, 1.0)
            freqs = freqs.reshape(self.max_seq, -1).float()
            cos, sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
            self.cache_spec = CacheSpec(True, self.c + self.dr, 1)
        else:
            self.kv_heads = attn0.num_query_groups_per_partition
            self.hd = attn0.hidden_size_per_attention_head
            if cfg.num_query_groups is not None and cfg.num_query_groups < self.tp_size:
                raise ConfigError("inference: fewer query groups than TP ranks is not supported for generation")
            self.softmax_scale = 1.0 / math.sqrt(self.hd)
            freqs = model.rotary_pos_emb(self.max_seq)
            freqs = freqs.reshape(self.max_seq, -1).float()
            if freqs.shape[-1] != self.hd:
                raise ConfigError(f"inference: rotary_percent: rotary embedding on {freqs.shape[-1]} of the "
                                  f"{self.hd} head dimensions is not implemented")
            cos, sin = torch.cos(freqs), torch.sin(freqs)
            self.cache_spec = CacheSpec(False, self.hd, self.kv_heads)
            # decode tables for q and k heads of a group at once ([.., g + 1, hd]): the query's rows carry the
            # softmax scale, the key's row does not
            g = self.heads // self.kv_heads
            qk_scale = torch.tensor([self.softmax_scale] * g + [1.0])[:, None]
        # RoPE rotates halves: x * cos + cat(-x2, x1) * sin == x * cos + cat(x2, x1) * cat(-sin1, sin2), one
        # multiply-add on the swapped halves; the sign lives in the table
        half = cos.shape[-1] // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        if not self.mla:  # per position [seq, 1, g + 1, hd]: one gather per decode step
            self._qk_cos = (cos[:, None, None, :] * qk_scale).to(self.dtype)
            self._qk_sin = (sin[:, None, None, :] * qk_scale).to(self.dtype)
        self.refresh()

    def refresh(self) -> None:
        """Look the layers' modules and parameters up again (after modules or Parameter objects were replaced)."""
        m = self.model
        self.weights = layer_adapter.read_model(m)
        self.layers = [_Layer(rec, self.dtype) for rec in self.weights.layers]
        self.final_norm = _norm_fn(self.weights.final_norm, self.dtype)
        self._fused = None  # built lazily by fused_decode_step (needs the extension)
        self._fused_checked = False
        self.embed_w = self.weights.embed_w  # None on a pipeline stage other than the first
        self.out_w = self.weights.out_w  # None on a pipeline stage other than the last
        device = self.model.decoder.layers[0].self_attention.linear_proj.weight.device
        self.device = device
        self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        if not self.mla:
            self._qk_cos, self._qk_sin = self._qk_cos.to(device), self._qk_sin.to(device)

    @property
    def routing_layers(self) -> list[int]:
        """Global indices (layer_number - 1) of this stage's MoE decoder layers: the layer axis of `last_routing`."""
        return [n for n, lyr in zip(self.weights.layer_numbers, self.layers) if lyr.moe is not None]

    def _begin_routing(self, lead: tuple) -> None:
        """`lead`: the token shape ([B, T] prefill, [B] decode), for a stage without MoE layers' empty record."""
        self._routing = [] if self.record_routing else None
        self._routing_lead = lead

    def _end_routing(self) -> None:
        if self._routing is not None:
            self.last_routing = (torch.stack(self._routing, dim=-2) if self._routing else torch.zeros(
                *self._routing_lead, 0, self.cfg.moe_router_topk or 1, dtype=torch.int16, device=self.device))
        self._routing = None

    # ---------------------------------------------------------------------------------- pieces
    def new_cache(self, max_batch: int, device=None, grow: bool = False) -> KVCache:
        """A contiguous `KVCache`: preallocated, or (`grow`) sized on demand by `reserve`."""
        device = device or self.device
        return KVCache(self.num_layers, self.cache_spec, max_batch, self.max_seq, self.dtype, device, grow=grow)

    def new_paged_cache(self, max_batch: int, block_size: int = 16, num_blocks: Optional[int] = None,
                        device=None):
        """A `paged_cache.PagedKVCache` of `num_blocks` blocks (None: the contiguous cache's memory)."""
        device = device or self.device
        return PagedKVCache(self.num_layers, self.cache_spec, max_batch, self.max_seq, self.dtype, device,
                            block_size=block_size, num_blocks=num_blocks)

    def _embed(self, tokens):
        w = self.embed_w
        if self.tp_size == 1:
            return F.embedding(tokens, w)
        start = self.tp_rank * w.shape[0]
        local = tokens - start
        outside = (local < 0) | (local >= w.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), w)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return _all_reduce(x, self.tp_group)

    def _logits(self, h):
        return _all_gather_last(F.linear(h, self.out_w), self.tp_group)

    def _residual_linear(self, x, y, w):
        """x + all_reduce(y @ w.T); without TP, a 2-D x is the linear's bias: the add rides on the matmul (addmm;
        F.linear folds 3-D inputs to 2-D and cannot broadcast a 3-D bias there)."""
        if self.tp_size == 1 and x.dim() == 2:
            return F.linear(y, w, x)
        return x + _all_reduce(F.linear(y, w), self.tp_group)

    def _tables(self, pos):
        """cos/sin rows [..., 1, d] for positions pos [...]: gathered once per forward, shared by all layers."""
        return self.cos[pos].unsqueeze(-2), self.sin[pos].unsqueeze(-2)

    def _rope(self, x, rope, deinterleave: bool):
        """Megatron's non-fused RoPE on x [..., heads, d] with the step's tables `rope` = (cos, signed sin)."""
        if deinterleave:  # MLA: rope dims arrive interleaved (x0, x1, x2, ...) and are regrouped first
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        cos, sin = rope
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)  # roll: cat(x2, x1) in one op

    def _mlp(self, x, fc1_w, fc2_w, residual=None):
        """SwiGLU MLP (fc1 = [gate; up]); with `residual`, returns residual + MLP(x)."""
        g, u = F.linear(x, fc1_w).chunk(2, dim=-1)
        h = F.silu(g).mul_(u)
        if residual is None:
            return _all_reduce(F.linear(h, fc2_w), self.tp_group)
        return self._residual_linear(residual, h, fc2_w)

    def _route(self, router: layer_adapter.MoE, x):
        """Megatron's top-k router (moe_utils.topk_routing_with_score_function, unfused): the top-k expert ids
        [N, k] and their probabilities [N, k] (in x's dtype) for tokens x [N, h]. Sigmoid scores with the expert
        bias steering only the choice (DeepSeek-V3), or softmax before or after top-k; group-limited top-k and
        the routed scaling factor for either."""
        cfg = self.cfg
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(cfg.moe_router_dtype, x.dtype)
        logits = F.linear(x.to(dtype), router.router_w.to(dtype))
        k, n_exp = cfg.moe_router_topk, cfg.num_moe_experts
        sigmoid = cfg.moe_router_score_function == "sigmoid"
        if sigmoid:
            scores = torch.sigmoid(logits.float()).type_as(logits)
            sel = scores + router.expert_bias if router.expert_bias is not None else scores
        elif cfg.moe_router_pre_softmax:
            scores = sel = torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits)
        else:
            scores = sel = logits  # softmax over the top-k only (the expert bias plays no part with softmax)
        if cfg.moe_router_group_topk:
            ng = cfg.moe_router_num_groups
            gs = sel.view(-1, ng, n_exp // ng).topk(k // cfg.moe_router_group_topk, dim=-1)[0].sum(-1)
            gidx = gs.topk(cfg.moe_router_group_topk, dim=-1, sorted=False)[1]
            gmask = torch.zeros_like(gs).scatter_(1, gidx, 1.0)
            emask = gmask.unsqueeze(-1).expand(-1, ng, n_exp // ng).reshape(-1, n_exp)
            sel = sel.masked_fill(emask == 0, float("-inf"))
        top_idx = sel.topk(k, dim=-1)[1]
        probs = torch.gather(scores, 1, top_idx)
        if sigmoid:
            if k > 1:
                probs = probs / (probs.sum(-1, keepdim=True) + 1e-20)
        elif not cfg.moe_router_pre_softmax:
            probs = torch.softmax(probs, dim=-1, dtype=torch.float32).type_as(logits)
        if cfg.moe_router_topk_scaling_factor:
            probs = probs * cfg.moe_router_topk_scaling_factor
        return top_idx, probs.to(x.dtype)

    def _moe(self, lyr: _Layer, x, static: bool = False):
        """Routed (+ shared) experts. `static`: no host sync and shapes independent of the routing (CUDA-graph
        capture): every local expert runs on every row, weighted by its routing prob, 0 where not routed."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        moe = lyr.moe
        top_idx, probs = self._route(moe, x)
        if self._routing is not None:
            self._routing.append(top_idx.to(torch.int16).view(*shape[:-1], top_idx.shape[-1]))
        if static:
            out = self._experts_dense(moe, x, top_idx, probs)
        else:
            out = self._experts_sorted(moe, x, top_idx, probs)
        out = _all_reduce(out, self.expert_group)
        if moe.shared is not None:
            out = out + self._mlp(x, moe.shared.fc1_w, moe.shared.fc2_w)
        return out.reshape(shape)

    def _experts_dense(self, moe: layer_adapter.MoE, x, top_idx, probs):
        """Each local expert on all rows x [N, h], scaled by its prob (a dense [N, experts] scatter of the top-k):
        a row not routed to an expert adds exactly 0, and experts are summed in ascending order like
        `_experts_sorted`, so the sums round the same. Costs experts/top-k times the expert FLOPs; every local
        expert's weights are read once per step, as they are whenever the batch reaches all of them."""
        dense = torch.zeros(x.shape[0], self.cfg.num_moe_experts, dtype=probs.dtype, device=x.device)
        dense.scatter_(1, top_idx, probs)
        out = torch.zeros_like(x)
        for e, expert in zip(moe.expert_ids, moe.experts):
            g, u = F.linear(x, expert.fc1_w).chunk(2, dim=-1)
            out += F.linear(F.silu(g) * u * dense[:, e:e + 1], expert.fc2_w)
        return out

    def _experts_sorted(self, moe: layer_adapter.MoE, x, top_idx, probs):
        """Each local expert on the rows routed to it: the eager path."""
        n_exp, k = self.cfg.num_moe_experts, top_idx.shape[-1]
        # Tokens grouped by expert with one sort and one host sync for all experts (not a nonzero() per expert).
        # A token meets its experts in ascending expert order, as before, so the sums round the same.
        flat = top_idx.reshape(-1)
        order = flat.argsort(stable=True)
        token_of = order // k
        counts = torch.bincount(flat, minlength=n_exp).tolist()
        starts = [0] * (n_exp + 1)
        for e in range(n_exp):
            starts[e + 1] = starts[e] + counts[e]
        prob_sorted = probs.reshape(-1)[order]
        out = torch.zeros_like(x)
        for e, expert in zip(moe.expert_ids, moe.experts):
            a, b = starts[e], starts[e + 1]
            if a == b:
                continue
            rows = token_of[a:b]
            g, u = F.linear(x[rows], expert.fc1_w).chunk(2, dim=-1)
            # Megatron scales the activation by the routing prob before fc2 (same rounding order)
            y = F.linear(F.silu(g) * u * prob_sorted[a:b].unsqueeze(-1), expert.fc2_w)
            out.index_add_(0, rows, y)
        return out

    def _ffn(self, lyr: _Layer, x, static: bool = False):
        """x + FFN(norm(x)); `static`: see `_moe`."""
        h = lyr.mlp_norm(x)
        if lyr.moe is not None:
            return x + self._moe(lyr, h, static)
        return self._mlp(h, lyr.fc1_w, lyr.fc2_w, residual=x)

    # ---------------------------------------------------------------------------------- attention
    def _mla_q(self, lyr: _Layer, x, rope):
        """Roped queries q [..., H, dn+dr] for hidden x [..., h]."""
        cfg, w = self.cfg, lyr.mla
        if cfg.q_lora_rank is not None:
            qc = _linear_gather(x, w.q_down_w, cfg.q_lora_rank, self.tp_group)
            q = F.linear(lyr.q_norm(qc), w.q_up_w)
        else:
            q = F.linear(x, w.q_proj_w)
        q = q.view(*q.shape[:-1], self.heads, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        return torch.cat([q_nope, self._rope(q_pe, rope, True)], dim=-1)

    def _mla_latent(self, lyr: _Layer, x, rope):
        """The cache entries cat(c_kv, roped k_pe) [..., c+dr] for hidden x [..., h]."""
        kv = _linear_gather(x, lyr.mla.kv_down_w, self.c + self.dr, self.tp_group)
        c, k_pe = kv.split([self.c, self.dr], dim=-1)
        k_pe = self._rope(k_pe.unsqueeze(-2), rope, True).squeeze(-2)
        return torch.cat([lyr.kv_norm(c), k_pe], dim=-1)

    def _mla_expand(self, lyr: _Layer, latent):
        """Expanded K [B,L,H,dn+dr] and V [B,L,H,dv] from cache entries [B,L,c+dr] (Megatron's layout)."""
        c, k_pe = latent.split([self.c, self.dr], dim=-1)
        kv = F.linear(c, lyr.mla.kv_up_w).view(*c.shape[:-1], self.heads, self.dn + self.dv)
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

    def _dense_qkv(self, lyr: _Layer, x, rope):
        """Megatron's grouped QKV layout -> roped q [B, T, kv_heads, g, hd], k and v [B, kv_heads, T, hd]."""
        B, T, _ = x.shape
        g = self.heads // self.kv_heads
        qkv = F.linear(x, lyr.qkv_w, lyr.qkv_b).view(B, T, self.kv_heads, g + 2, self.hd)
        rope = (rope[0].unsqueeze(-2), rope[1].unsqueeze(-2))  # [B, T, 1, 1, hd]
        qk = self._rope(qkv[:, :, :, :g + 1], rope, False)  # q and k heads take the same rotation: one pass
        return qk[:, :, :, :g], qk[:, :, :, g].transpose(1, 2), qkv[:, :, :, g + 1].transpose(1, 2)

    def _attention_full(self, i, lyr: _Layer, x, rope, mask, cache, row0, last=None):
        """Attention over the tokens of x (prefill); writes their cache entries at rows row0... With `last`
        ([B] indices of each row's last token), only those tokens' outputs are computed: [B, h] not [B, T, h]."""
        B, T, _ = x.shape
        rows = torch.arange(B, device=x.device)
        if self.mla:
            lat = self._mla_latent(lyr, x, rope)
            if cache is not None:
                cache.write_prefill(i, row0, lat=lat)
            if last is not None:  # queries of the last tokens only (q_down/q_up skipped for the others)
                x, rope = x[rows, last].unsqueeze(1), tuple(t[rows, last].unsqueeze(1) for t in rope)
                mask = mask[rows, :, last].unsqueeze(2)
            q = self._mla_q(lyr, x, rope)
            k, v = self._mla_expand(lyr, lat)
            o = self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        else:
            q, k, v = self._dense_qkv(lyr, x, rope)  # q [B, T, kv_heads, g, hd]
            if cache is not None:
                cache.write_prefill(i, row0, k=k, v=v)
            if last is not None:
                q, mask = q[rows, last].unsqueeze(1), mask[rows, :, last].unsqueeze(2)
            Tq = q.shape[1]
            # q heads of group j are j*g .. j*g+g-1: group them so K/V heads need no repeat
            q = q.permute(0, 2, 3, 1, 4).reshape(B, self.heads, Tq, self.hd)
            o = self._attend(q, k, v, mask)
        if last is not None:
            o = o[:, 0]
        return _all_reduce(F.linear(o, lyr.proj_w), self.tp_group)

    def _attention_decode(self, i, lyr: _Layer, x, rope, bias, slots, cache, L, table=None):
        """One new token per row (rows 0..B-1 of the cache), attending to cache positions < L (bias masks each
        row). x [B, h]; `slots`: flat indices of the new entries in the cache viewed as rows of one entry;
        `table`: the paged cache's block table slice (None: contiguous rows). Returns the attention block's output
        before the residual add, [B, heads * dv]."""
        B = x.shape[0]
        if self.mla:
            q = self._mla_q(lyr, x, rope)  # [B, H, dn+dr]
            lat = self._mla_latent(lyr, x, rope)  # [B, c+dr]
            cache.latent[i].view(-1, lat.shape[-1]).index_copy_(0, slots, lat)
            lat_all = cache.read(i, B, L, table)  # [B, L, c+dr]
            if self.mla_absorb:
                w = lyr.mla.kv_up_w.view(self.heads, self.dn + self.dv, self.c)
                w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]  # [H, dn, c], [H, dv, c]
                q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)  # [B, H, *]
                # per-head products as head-batched bmm (what einsum would run, without its parsing per call)
                q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, c]
                qa = torch.cat([q_lat, q_pe], dim=-1) * self.softmax_scale  # scores against raw cache entries
                s = torch.baddbmm(bias.unsqueeze(1), qa, lat_all.transpose(1, 2))  # [B, H, L]
                o_lat = torch.bmm(torch.softmax(s, dim=-1), lat_all[..., :self.c])  # [B, H, c]
                o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2))  # [H, B, dv]
                return o.transpose(0, 1).reshape(B, self.heads * self.dv)
            k, v = self._mla_expand(lyr, lat_all)
            mask = (bias == 0).view(B, 1, 1, L)
            return self._attend(q.unsqueeze(2), k.transpose(1, 2), v.transpose(1, 2), mask).view(B, -1)
        hd, kvh = self.hd, self.kv_heads
        g = self.heads // kvh
        qkv = F.linear(x, lyr.qkv_w, lyr.qkv_b).view(B, kvh, g + 2, hd)
        qk = qkv[:, :, :g + 1]
        cos, sin = rope  # [B, 1, g + 1, hd], the query rows pre-scaled by the softmax scale
        torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin, out=qk)
        kv = cache.kv[i]  # contiguous [slots, kv_heads, seq, 2 * hd] or paged [blocks, kv_heads, block, 2 * hd]
        kv.view(-1, 2 * hd).index_copy_(0, slots, qkv.view(B * kvh, (g + 2) * hd)[:, g * hd:])  # new K and V, one copy
        kv = cache.read(i, B, L, table)  # [B, kv_heads, L, 2 * hd]
        s = torch.matmul(qkv[:, :, :g], kv[..., :hd].transpose(-1, -2))  # [B, kv_heads, g, L]
        p = torch.softmax(s.add_(bias.view(B, 1, 1, L)), dim=-1)
        # [B, kv_heads, g, hd]: head j*g + h of group j is already in Megatron's head order
        return torch.matmul(p, kv[..., hd:]).view(B, self.heads * hd)

    # ---------------------------------------------------------------------------------- entry points
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, cache: Optional[KVCache] = None,
                row0: int = 0, all_logits: bool = False) -> Optional[torch.Tensor]:
        """Forward right-padded prompts tokens [B, T] with lengths [B]; fill cache rows row0..row0+B-1.

        Returns the logits [B, V] at each row's last prompt token, or [B, T, V] with `all_logits`; None on a
        pipeline stage other than the last (it sent its hidden states on).
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
        x = self._stage_input(tokens, (B, T, self.hidden_size))
        rope = self._tables(pos)
        if cache is not None:
            cache.set_lengths(row0, lengths)
            cache.begin_prefill(row0, B, T)
        n = len(self.layers)
        # only the last tokens' logits are needed (see the module docstring), unless every token's routing is
        # recorded: then the last layer routes them all. Earlier pipeline stages send every position on.
        shortcut = not all_logits and not self.record_routing and self.last_stage
        self._begin_routing((B, T))
        for i, lyr in enumerate(self.layers):
            h = lyr.in_norm(x)
            if i == n - 1 and shortcut:
                last = lengths - 1
                x = x[torch.arange(B, device=x.device), last]
                x = x + self._attention_full(i, lyr, h, rope, mask, cache, row0, last=last)
            else:
                x = x + self._attention_full(i, lyr, h, rope, mask, cache, row0)
            x = self._ffn(lyr, x)
        self._end_routing()
        if not self.last_stage:
            _pp_send(x, self.pp_group)
            return None
        if not all_logits and not shortcut:
            x = x[torch.arange(B, device=x.device), lengths - 1]
        return self._logits(self.final_norm(x))

    def _stage_input(self, tokens: torch.Tensor, shape: tuple) -> torch.Tensor:
        """The first stage's embedded tokens, or a later pipeline stage's input from the previous stage."""
        if self.first_stage:
            return self._embed(tokens)
        return _pp_recv(shape, self.dtype, tokens.device, self.pp_group)

    def fused_decode_reason(self) -> Optional[str]:
        """Why the fused CPU decode step (csrc/cpu_decode.cpp) does not apply to this model, or None if it does:
        a dense fp32 model on the CPU without TP with a norm in front of every block (the C++ step implements
        RMSNorm; the adapter has refused any other norm). Its weights come from `layer_adapter`, so the local and
        the TE layout both run it."""
        if self.mla:
            return "multi-latent attention"
        if self.pp_size > 1:
            return "pipeline parallelism"
        if self.tp_size > 1:
            return "tensor parallelism"
        if self.dtype != torch.float32 or self.device.type != "cpu":
            return f"{self.dtype} on {self.device.type}"
        if any(lyr.moe is not None for lyr in self.layers):
            return "mixture-of-experts layers"
        norms = self.weights.norms()
        if any(n is None for n in norms):
            return "a block without a norm"
        if any(n.weight.dtype != torch.float32 for n in norms):
            return "norm weights other than fp32"
        return None

    def fused_decode_step(self):
        """The fused step's extension and the parameter lists it reads (the Parameter objects: in-place updates
        are seen), or None where it does not apply or could not be built. Decided once per refresh(); the first
        call builds the extension if this machine has no build yet (~20 s)."""
        if not self._fused_checked:
            self._fused_checked = True
            if self.fused_decode_reason() is None:
                if cpu_kernels.available():
                    layers, eps = [], []
                    empty = torch.empty(0)
                    for rec, lyr in zip(self.weights.layers, self.layers):
                        layers += [rec.in_norm.weight, lyr.qkv_w, lyr.qkv_b if lyr.qkv_b is not None else empty,
                                   lyr.proj_w, rec.mlp_norm.weight, lyr.fc1_w, lyr.fc2_w]
                        eps += [rec.in_norm.eps, rec.mlp_norm.eps]
                    final = self.weights.final_norm
                    eps.append(final.eps)
                    self._fused = (cpu_kernels.load(), layers, eps, final.weight)
        return self._fused

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache,
               max_len: Optional[int] = None) -> Optional[torch.Tensor]:
        """One step for cache rows 0..B-1: tokens [B] at positions pos [B] -> logits [B, V].

        `max_len`: attend over that many cache positions (>= max(pos) + 1; the bias masks each row's rest) and run
        MoE layers without a host sync: shapes depend on B and max_len alone, what CUDA-graph capture needs
        (`cuda_graphs.StaticDecoder`). None: max(pos) + 1, read from the device."""
        # the fused step (csrc/cpu_decode.cpp) reads contiguous rows or walks a paged cache's block table
        fused = self.fused_decode_step() if self.use_fused and max_len is None else None
        if fused is not None:
            ext, layers, eps, final_w = fused
            S = cache.bias.shape[1]  # the rope tables' rows must match the cache's positions (a growing cache)
            if cache.paged:
                cache.sync()
                table, block = cache.block_table, cache.block_size
            else:
                table, block = _NO_TABLE, 0
            return ext.dense_decode(tokens, pos, self.embed_w, layers, eps, final_w, self.out_w, cache.kv,
                                    cache.bias, self.cos[:S], self.sin[:S], self.kv_heads,
                                    self.heads // self.kv_heads, self.hd, self.softmax_scale, table, block)
        B = tokens.shape[0]
        if max_len is None:  # eager: a paged cache's changed block-table rows go to the device (static: the caller)
            cache.sync()
        L = int(pos.max()) + 1 if max_len is None else int(max_len)
        x = self._stage_input(tokens, (B, self.hidden_size))  # [B, h]
        cache.bias[:B].scatter_(1, pos.unsqueeze(1), 0.0)  # the new token is visible from now on
        bias = cache.bias[:B, :L]
        # where each row's new K/V (or latent) goes, as flat row indices into the cache, and (paged) the block
        # table slice each layer gathers: once per step
        slots, table = cache.decode_index(B, pos, L)
        if self.mla:
            rope = self._tables(pos)  # [B, 1, d]
        else:
            rope = (self._qk_cos[pos], self._qk_sin[pos])  # [B, 1, g + 1, hd]
        self._begin_routing((B,))
        for i, lyr in enumerate(self.layers):
            o = self._attention_decode(i, lyr, lyr.in_norm(x), rope, bias, slots, cache, L, table)
            x = self._ffn(lyr, self._residual_linear(x, o, lyr.proj_w), static=max_len is not None)
        self._end_routing()
        if not self.last_stage:
            _pp_send(x, self.pp_group)
            return None
        return self._logits(self.final_norm(x))
