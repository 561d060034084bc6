"""The paged KV cache: fixed-size blocks from one pool, a block table per request, prefix blocks shared by reference.

Why: a contiguous cache reserves `max_seq` positions per running request, so at R1's long-tailed response lengths
(median a few hundred tokens, tail 8k-32k) almost all of it sits empty, and the number of requests that run at
once is set by the longest answer anyone might write. Here memory is spent as tokens arrive: a request holds
ceil(length / block_size) blocks, takes a new one when its next token crosses a block boundary, and gives them all
back when it ends (vLLM's PagedAttention layout; Kwon et al., SOSP 2023).

Layout, per layer (the same entries as the contiguous `functional.KVCache`, only the row dimension is a block):
- MLA: [num_blocks, block_size, kv_lora_rank + rope] — the normalised compressed latent and the roped shared key;
- dense: [num_blocks, kv_heads, block_size, 2 * head_dim] — K and V side by side.
Block 0 is scratch, never handed out: unused block-table entries point at it, so a prefill's padding positions
beyond a row's blocks and the padding rows of a CUDA-graph batch bucket write there, and reads of positions past
a row's length (masked by the row's -inf attention bias) read finite values.

Sharing: the G answers of a GRPO prompt are prefilled once; the others reference the same blocks (ref counts).
Before a row writes into a block another row also references (the prompt's last, partial block), it gets a private
copy of that block (copy-on-write); full prompt blocks stay shared until the last reader ends.

What the functional forward sees: `decode_index` turns positions into flat slot indices (where a step's new
entries go) and a [B, blocks] block table slice (what `read` gathers, then cuts to L positions). Shapes depend
on B and L only, so the CUDA-graph decode (cuda_graphs.py) captures a paged step like a contiguous one; the block
table is a persistent device tensor updated in place between steps (`sync`). The fused CPU decode step
(csrc/cpu_decode.cpp) reads `block_table` itself and walks each row's blocks, with no gather.

Accounting (what the engine schedules with, and `megatron-r1 plan` sizes with `blocks_for_memory`): a pool of N
blocks holds N * block_size tokens of `bytes_per_token` each. The engine preempts the newest requests (recompute)
when a step needs more blocks than are free, so the pool bounds memory instead of an OOM.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_r1.errors import ConfigError

SCRATCH = 0  # block id of the scratch block


def bytes_per_token(spec, num_layers: int, dtype) -> int:
    """Cache bytes one token takes over all layers (MLA: the latent + rope key; dense: K and V of this rank's heads)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = spec.width if spec.mla else 2 * spec.kv_heads * spec.width
    return num_layers * per_layer * elem


def default_num_blocks(max_batch: int, max_seq: int, block_size: int) -> int:
    """The pool when no size is configured (scratch block included): every row may reach `max_seq` positions, the
    contiguous cache's memory. `megatron-r1 plan` counts the same."""
    return max_batch * math.ceil(max_seq / block_size) + 1


def blocks_for_memory(memory_gb: float, block_size: int, token_bytes: int) -> int:
    """Blocks (scratch included) that fit in `memory_gb` GiB of cache at `token_bytes` per token."""
    return int(memory_gb * 2 ** 30 // (block_size * token_bytes))


class BlockPool:
    """Free list and reference counts of blocks 1..num_blocks-1 (block 0 is scratch). Host-side bookkeeping only."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first (deterministic)
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache block pool exhausted (the scheduler should have preempted first)")
        b = self._free.pop()
        self.refs[b] = 1
        self.peak_used = max(self.peak_used, self.num_used)
        return b

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self._free.append(block)
        elif self.refs[block] < 0:
            raise RuntimeError(f"KV cache block {block} released more often than it was referenced")


class PagedKVCache:
    """Per-layer block pools plus a block table and an attention-bias row per slot row; see the module docstring.
    The engine keeps running requests in slot rows 0..n-1 as with the contiguous cache; a row's entries live in the
    blocks its table names."""

    paged = True
    version = 0  # the pools never move (a growing contiguous cache counts its reallocations here)

    def __init__(self, num_layers: int, spec, max_batch: int, max_seq: int, dtype, device,
                 block_size: int = 16, num_blocks: Optional[int] = None):
        if block_size < 1:
            raise ConfigError(f"generation.kv_block_size must be >= 1, got {block_size}")
        self.spec, self.max_batch, self.max_seq, self.block_size = spec, max_batch, max_seq, int(block_size)
        self.max_blocks = math.ceil(max_seq / block_size)  # per row
        if num_blocks is None:
            num_blocks = default_num_blocks(max_batch, max_seq, self.block_size)
        num_blocks = int(num_blocks)
        if num_blocks - 1 < self.max_blocks:
            raise ConfigError(
                f"generation.kv_cache_blocks / kv_cache_memory_gb: the pool has {num_blocks - 1} usable blocks of "
                f"{block_size} tokens, fewer than the {self.max_blocks} one request of the full context "
                f"({max_seq} tokens) needs; every request must be able to run alone")
        self.num_blocks = num_blocks
        if spec.mla:
            self.latent = [torch.zeros(num_blocks, block_size, spec.width, dtype=dtype, device=device)
                           for _ in range(num_layers)]
            self.kv = None
        else:
            shape = (num_blocks, spec.kv_heads, block_size, 2 * spec.width)
            self.kv = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
            self.latent = None
        self.bias = torch.full((max_batch, max_seq), float("-inf"), dtype=dtype, device=device)
        self.block_table = torch.zeros(max_batch, self.max_blocks, dtype=torch.long, device=device)
        self._host = torch.zeros(max_batch, self.max_blocks, dtype=torch.long)  # the table's host mirror
        self._dirty: set[int] = set()
        self.pool = BlockPool(num_blocks)
        self.rows: list[list[int]] = [[] for _ in range(max_batch)]  # each slot row's blocks, in order
        self._offsets = torch.arange(block_size, device=device)
        self._heads = torch.arange(spec.kv_heads, device=device)
        self._prefill_slots: Optional[torch.Tensor] = None
        self._buf: Optional[torch.Tensor] = None  # read()'s gather target on the CPU, grown to the largest step

    # ------------------------------------------------------------------------------------------ accounting
    def _tensors(self) -> list[torch.Tensor]:
        return self.latent if self.spec.mla else self.kv

    def nbytes(self) -> int:
        """Bytes of the block pools (scratch block included); the bias and block table are not counted."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def bytes_per_token(self) -> int:
        return self.nbytes() // (self.num_blocks * self.block_size)

    def gather_bytes(self) -> int:
        """Bytes of `read`'s reused CPU gather buffer: its largest step's B rows x the step's longest length, one
        layer's entries (0 on CUDA, where gathers are transient allocations). Not in `nbytes`: memory a paged
        decode without a paged-attention kernel needs beside the pool."""
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()

    def blocks_for(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def reserve(self, rows: int, seq: int) -> bool:
        """Nothing to grow: the pool is allocated whole (the contiguous cache's hook)."""
        return False

    def row_blocks(self, row: int) -> list[int]:
        return list(self.rows[row])

    # ------------------------------------------------------------------------------------------ rows
    def _set(self, row: int, blocks: list[int]) -> None:
        self.rows[row] = blocks
        self._host[row].zero_()
        if blocks:
            self._host[row, :len(blocks)] = torch.tensor(blocks)
        self._dirty.add(row)

    def allocate_row(self, row: int, n_tokens: int) -> None:
        """Give an empty row the blocks for its first `n_tokens` positions (a prefill)."""
        if self.rows[row]:
            raise RuntimeError(f"slot row {row} still holds blocks")
        self._set(row, [self.pool.allocate() for _ in range(self.blocks_for(n_tokens))])

    def release_row(self, row: int) -> None:
        """Return a row's blocks (ref counts drop; a shared block is freed by its last reader)."""
        for b in self.rows[row]:
            self.pool.release(b)
        self._set(row, [])
        self.bias[row].fill_(float("-inf"))

    def release_all(self) -> None:
        for row in range(self.max_batch):
            if self.rows[row]:
                self.release_row(row)

    def move_row(self, src: int, dst: int, length: int) -> None:
        """Row `dst` (already released) takes over row `src`'s blocks and bias; `src` becomes empty. No K/V moves."""
        self._set(dst, self.rows[src])
        self.bias[dst] = self.bias[src]
        self._set(src, [])
        self.bias[src].fill_(float("-inf"))

    def copy_rows(self, src, dst, length: int) -> None:
        """Rows `dst` reference the blocks of rows `src` (ints or index tensors) and copy their bias: the prompt
        prefilled once serves G answers; the shared last block is copied on its first write (`prepare_write`)."""
        src_l = src.tolist() if torch.is_tensor(src) else [src]
        dst_l = dst.tolist() if torch.is_tensor(dst) else [dst]
        for s, d in zip(src_l, dst_l):
            if self.rows[d]:
                raise RuntimeError(f"slot row {d} still holds blocks")
            for b in self.rows[s]:
                self.pool.share(b)
            self._set(d, list(self.rows[s]))
        self.bias[dst] = self.bias[src]

    def needs_block(self, row: int, pos: int) -> bool:
        """Whether writing position `pos` of `row` first needs a block from the pool (a new one, or a private copy
        of a shared one)."""
        j = pos // self.block_size
        blocks = self.rows[row]
        return j >= len(blocks) or self.pool.refs[blocks[j]] > 1

    def prepare_write(self, row: int, pos: int) -> None:
        """Make position `pos` of `row` writable: append a block, or copy a shared block (copy-on-write)."""
        j = pos // self.block_size
        blocks = list(self.rows[row])
        if j >= len(blocks):
            if j != len(blocks):
                raise RuntimeError(f"row {row}: position {pos} skips a block")
            blocks.append(self.pool.allocate())
        elif self.pool.refs[blocks[j]] > 1:
            old, new = blocks[j], self.pool.allocate()
            for t in self._tensors():
                t[new] = t[old]
            self.pool.release(old)
            blocks[j] = new
        else:
            return
        self._set(row, blocks)

    def sync(self) -> None:
        """Copy changed block-table rows to the device table (in place: CUDA graphs hold its address). Called by the
        scheduler before a step, outside any graph capture."""
        if self._dirty:
            rows = torch.tensor(sorted(self._dirty))
            self.block_table[rows.to(self.block_table.device)] = self._host[rows].to(self.block_table.device)
            self._dirty.clear()

    # ------------------------------------------------------------------------------------------ forward hooks
    def set_lengths(self, row0: int, lengths: torch.Tensor) -> None:
        """Rows row0.. now hold `lengths` cached positions each (after a prefill)."""
        visible = torch.arange(self.max_seq, device=lengths.device)[None, :] < lengths[:, None]
        self.bias[row0:row0 + lengths.shape[0]].zero_().masked_fill_(~visible, float("-inf"))

    def begin_prefill(self, row0: int, B: int, T: int) -> None:
        """Flat slot indices of positions 0..T-1 of rows row0..row0+B-1 (positions past a row's blocks: scratch)."""
        self.sync()
        pos = torch.arange(T, device=self.block_table.device)
        blk = self.block_table[row0:row0 + B, pos // self.block_size]  # [B, T]
        self._prefill_slots = self._slots(blk, pos % self.block_size)

    def _slots(self, blk: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """Flat row indices into a layer's pool viewed as [-1, entry] for blocks / offsets [B, T]: MLA blk*bs + off
        in (row, position) order; dense (blk*kvh + h)*bs + off in (row, head, position) order, the writes' order."""
        bs = self.block_size
        if self.spec.mla:
            return (blk * bs + off).reshape(-1)
        kvh = self.spec.kv_heads
        return ((blk.unsqueeze(-2) * kvh + self._heads[:, None]) * bs + off.unsqueeze(-2)).reshape(-1)

    def write_prefill(self, i: int, row0: int, lat: Optional[torch.Tensor] = None,
                      k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None) -> None:
        """Store a prefill's entries: MLA lat [B, T, w]; dense k, v [B, kv_heads, T, hd]."""
        slots = self._prefill_slots
        if self.spec.mla:
            self.latent[i].view(-1, lat.shape[-1]).index_copy_(0, slots, lat.reshape(-1, lat.shape[-1]))
        else:
            kv = torch.cat([k, v], dim=-1)
            self.kv[i].view(-1, kv.shape[-1]).index_copy_(0, slots, kv.reshape(-1, kv.shape[-1]))

    def decode_index(self, B: int, pos: torch.Tensor, L: int):
        """(slots of the new entries at positions pos [B] of rows 0..B-1, what `read` gathers: the flat indices of
        the blocks holding positions 0..L-1 of each row, computed once per step for every layer). Device ops only,
        no host sync: runs inside CUDA-graph capture."""
        table = self.block_table[:B]
        blk = table.gather(1, (pos // self.block_size).unsqueeze(1))  # [B, 1]: one position per row
        slots = self._slots(blk, (pos % self.block_size).unsqueeze(1))
        table = table[:, :math.ceil(L / self.block_size)]
        if self.spec.mla:
            return slots, table.reshape(-1)
        # dense: one index per (row, head, block) into the pool viewed as [blocks * kv_heads, block * entry], so
        # the gather lands in [B, kv_heads, positions, entry] order directly
        kvh = self.spec.kv_heads
        return slots, (table.unsqueeze(1) * kvh + self._heads[:, None]).reshape(-1)

    def read(self, i: int, B: int, L: int, index: torch.Tensor) -> torch.Tensor:
        """Rows 0..B-1's first L entries, gathered from their blocks (`decode_index`'s index): MLA [B, L, w]; dense
        [B, kv_heads, L, 2*hd]. Why one `index_select` of whole blocks into a buffer kept across layers and steps:
        the gather is B x L entries every layer (every row is read up to the step's longest length), the largest
        cost of a paged CPU step; gathering then reshaping copied it twice into fresh tensors (profile, 28 rows of
        ~300-500 positions: those two copies were 54% of a step, the attention matmuls 24%; now 19% and 45%)."""
        t = self._tensors()[i]
        bs = self.block_size
        pool = t.view(t.shape[0] * (1 if self.spec.mla else self.spec.kv_heads), -1)  # one row per (block, head)
        out = self._gather_buffer(index.shape[0] * pool.shape[1], t)
        torch.index_select(pool, 0, index, out=out.view(index.shape[0], pool.shape[1]))
        if self.spec.mla:
            return out.view(B, -1, t.shape[-1])[:, :L]
        nb = index.shape[0] // (B * self.spec.kv_heads)
        return out.view(B, self.spec.kv_heads, nb * bs, t.shape[-1])[:, :, :L]

    def _gather_buffer(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """`numel` elements of scratch for `read` (a layer's gather is consumed before the next layer reads). CPU
        only: on CUDA the caching allocator already reuses memory, and a CUDA graph must own its tensors."""
        if like.device.type != "cpu":
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        if self._buf is None or self._buf.numel() < numel:
            self._buf = torch.empty(numel, dtype=like.dtype)
        return self._buf[:numel]
