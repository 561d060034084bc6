"""Decode steps with static shapes per (batch, length) bucket, captured once per bucket as a CUDA graph and replayed.

Why: at decode batch sizes a step launches a few kernels per layer, each doing little, so on a GPU the host's
launch cost (Python, dispatch, the launches themselves) outlasts the kernels. A CUDA graph replays the whole
step's kernels with one launch. Capture needs the same shapes and buffers at every replay and no host
synchronisation inside the step; the eager step has neither (its shapes follow the batch and the longest row,
and its MoE split reads per-expert counts back to the host). So here:

- rows are padded up to a batch bucket (`batch_buckets`: 1, 2, 4, 8, 16, 24, 32, 48, 64, ... up to the
  engine's `max_batch_size`). The scheduler keeps running requests in slot rows 0..n-1, so a bucket of B rows
  is rows [:B] of the cache; the padding rows are free slots, which decode at position 0 (their result is
  discarded; a contiguous row's write is overwritten by a later prefill, a paged free row's table points at the
  scratch block). With the paged cache (paged_cache.py) the block table is a device tensor of fixed shape
  [max_batch, max_seq / block_size], updated in place before each step (`sync`, outside the graph); a step
  gathers the table's first ceil(L / block_size) columns of B rows, a static shape per bucket;
- tokens and positions are copied into this object's own device buffers, the graph's inputs;
- attention spans a length bucket (`length_buckets`, powers of two from 64 up to the context), chosen on the
  host from the requests' lengths, which the scheduler already knows: no read-back. Each row's additive bias
  (0 at its cached positions, -inf beyond) masks the rest, which adds exactly 0 to the softmax;
- MoE layers run every local expert on every row weighted by its routing prob (`FunctionalGPT.decode(max_len=)`);
  with `fn.record_routing` the step's expert ids are a graph output too (`fn.last_routing` after each replay).

Graphs are captured lazily, the first time a (batch, length) bucket is met, into one shared memory pool, after a
warm-up on a side stream (what torch.cuda.graphs asks for). A decode step's cache writes depend only on its
inputs, so the warm-up repeating the step leaves the cache as one step would. Graphs read parameters and the
cache through the addresses they had at capture: an optimizer step (in place) or a refit by copy is seen;
`invalidate_if_moved()` drops the graphs when a refit replaced parameter storage, and a growing contiguous cache
(functional.KVCache(grow=True)) is first grown to the step's bucket, its graphs dropped when that reallocated it.

On the CPU (or with capture off) the same bucketed step runs eagerly: that is how the CPU tests check that
bucketing changes no output, and a `gpu`-marked test checks that a replay equals the eager step.
"""
from __future__ import annotations

import bisect
from typing import Optional

import torch

from megatron_r1.inference.functional import FunctionalGPT, KVCache
from megatron_r1.inference.paged_cache import PagedKVCache


def batch_buckets(max_batch: int) -> list[int]:
    """Padded batch sizes: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x between them, so padding
    wastes at most a third of a step), ending at max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, p = [1, 2, 4, 8], 8
    while sizes[-1] < max_batch:
        sizes += [p * 2, p * 3]  # 2p then 3p: 16, 24, 32, 48, ...
        p *= 2
        sizes[-2:] = sorted(sizes[-2:])
    return sorted({s for s in sizes if s < max_batch} | {max_batch})


def length_buckets(max_seq: int, smallest: int = 64) -> list[int]:
    """Attention lengths: powers of two from `smallest`, ending at the context `max_seq` itself. A step reads the
    cache up to its bucket, so a row of length l costs at most 2l (or `smallest`) positions of cache traffic."""
    sizes = []
    n = smallest
    while n < max_seq:
        sizes.append(n)
        n *= 2
    return sizes + [max_seq]


def bucket_for(n: int, buckets: list[int]) -> int:
    """The smallest bucket >= n."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]


class _Graph:
    __slots__ = ("graph", "out", "routing")

    def __init__(self, graph, out, routing=None):
        self.graph, self.out, self.routing = graph, out, routing


class StaticDecoder:
    """Bucketed decode over `cache` rows 0..n-1; captured as CUDA graphs when `capture` (see the module doc)."""

    def __init__(self, fn: FunctionalGPT, cache: KVCache | PagedKVCache, capture: bool,
                 batch_sizes: Optional[list[int]] = None, lengths: Optional[list[int]] = None):
        if capture and cache.bias.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs the model and cache on a CUDA device")
        self.fn, self.cache, self.capture = fn, cache, bool(capture)
        self.batch_sizes = sorted(batch_sizes or batch_buckets(cache.max_batch))
        self.lengths = sorted(lengths or length_buckets(cache.max_seq))
        if self.batch_sizes[-1] > cache.max_batch or self.lengths[-1] > cache.max_seq:
            raise ValueError(f"buckets exceed the cache ({cache.max_batch} rows, {cache.max_seq} positions)")
        device = cache.bias.device
        self.tokens = torch.zeros(cache.max_batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(cache.max_batch, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._fingerprint = self._addresses()
        self._cache_version = cache.version

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, max_len: int) -> torch.Tensor:
        """Logits [n, V] for tokens [n] at positions pos [n] (rows 0..n-1); `max_len` >= max(pos) + 1, from the
        host. With capture the result is a view of the graph's output buffer, valid until the next call."""
        n = tokens.shape[0]
        B, L = bucket_for(n, self.batch_sizes), bucket_for(max_len, self.lengths)
        self.cache.reserve(B, L)  # a growing contiguous cache (functional.KVCache) makes room for the bucket
        if self.cache.version != self._cache_version:  # reallocated: graphs captured on the old tensors are stale
            self._cache_version = self.cache.version
            self.graphs.clear()
        self.cache.sync()  # a paged cache's block table, updated in place outside the graph
        self.tokens[:n].copy_(tokens)
        self.pos[:n].copy_(pos)
        if B > n:  # padding rows: free slots, decoded at position 0 (see the module docstring)
            self.tokens[n:B].zero_()
            self.pos[n:B].zero_()
        if not self.capture:
            return self.fn.decode(self.tokens[:B], self.pos[:B], self.cache, max_len=L)[:n]
        entry = self.graphs.get((B, L))
        if entry is None:
            entry = self.graphs[(B, L)] = self._capture(B, L)
        entry.graph.replay()
        if entry.routing is not None:  # the recorded expert ids (fn.record_routing): the graph's output buffer
            self.fn.last_routing = entry.routing
        return entry.out[:n]

    def _capture(self, B: int, L: int) -> _Graph:
        args = (self.tokens[:B], self.pos[:B], self.cache)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy library init and allocations happen outside the capture
            for _ in range(2):
                self.fn.decode(*args, max_len=L)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn.decode(*args, max_len=L)
        return _Graph(graph, out, self.fn.last_routing if self.fn.record_routing else None)

    def _addresses(self) -> tuple:
        fn = self.fn
        tensors = [p for p in fn.model.parameters()] + [fn.cos, fn.sin, fn.embed_w, fn.out_w]
        return tuple(t.data_ptr() for t in tensors)

    def invalidate_if_moved(self) -> bool:
        """Drop the captured graphs if a parameter (or a table) now lives at another address; True if dropped."""
        now = self._addresses()
        if now == self._fingerprint:
            return False
        self._fingerprint = now
        self.graphs.clear()
        return True

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)
