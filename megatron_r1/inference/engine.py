"""`Engine`: continuous-batching generation on the trainer's Megatron model (KV cache, sampling, log-probs, refit).

Scheduling, one `step()` at a time:
1. drop aborted requests (their slot is freed at once);
2. admit waiting requests into free cache slots (FIFO, bounded by `max_batch_size` and `max_prefill_tokens`)
   and prefill them together (right-padded batch), sampling each one's first token. Requests admitted together
   with the same sequence (GRPO's G samples of a prompt, a server request with n > 1) are prefilled once; the
   others get copies of its cache rows and logits, and sample with their own seeds (stats
   `prefill_tokens_shared` counts the prompt tokens not computed; copies cost no prefill budget);
3. one batched decode step over every running request (per-row positions and length masks), then sampling.
   On CUDA the step has static shapes per batch/length bucket and is replayed as a CUDA graph
   (`cuda_graphs=True`, the default; see cuda_graphs.py); elsewhere it runs eagerly.
Running requests always occupy cache rows 0..n-1: when one finishes, the last row is moved into its place.

The cache (`kv_cache`): "paged" (paged_cache.py) holds each request's positions in fixed-size blocks from one
pool, taken as tokens arrive and returned when it ends; copies of a prefilled sequence reference its blocks
(copy-on-write of the shared last block). Admission waits for free blocks (prompt + first token, a 1% watermark
kept back), and when a decode step needs more blocks than are free the newest running requests are preempted:
their blocks are freed and they go back to the front of the queue, to be re-prefilled (prompt + tokens so far)
when blocks free up. Nothing is lost and memory never grows past the pool (stats `preemptions`,
`kv_blocks_peak`). "contiguous" gives each request a row of positions (functional.KVCache): what the fused CPU
decode step reads, so "auto" picks it where that step applies (a dense fp32 CPU model) and paged elsewhere. It
is sized from the requests: it grows (reallocation + copy) to the running rows and the longest one's length, each
rounded up to a power of two, never past max_batch_size x max_seq_len, and is freed when the engine is idle; with
`kv_cache_memory_gb` it never grows past that budget (admission waits, and a step that would cross it preempts the
newest requests like a full paged pool). Stats `kv_cache_bytes_peak`: the most either cache held.

Every rank of a TP group (and, with EP > 1, every rank of the model) must submit the same requests in the same
order: the schedule is deterministic, and the sampled tokens are broadcast from the group's first rank so all ranks
agree even if their floating-point results differed.

Pipeline parallelism (PP > 1): every stage runs the same schedule on its own layers' cache (so the stages agree on
the cache's size: a paged pool of the same block count on every rank), the hidden states go stage to stage
(functional.py), the last stage samples, and its tokens and log-probs are broadcast over the pipeline group. The
eager step runs (no CUDA graphs: a captured step cannot hold the stages' point-to-point transfers).

Refit (`refit()`): when the engine runs on the trainer's own modules the parameters are shared, so an optimizer
step is already visible; `refit()` only bumps `weight_version` and invalidates the caches. With another source
(a model of the same layout, or a full unsharded state dict from `weights.full_state_dict`) the tensors are copied
in memory into the engine's model first. In-flight requests are re-prefilled on the new weights (their prompt plus
the tokens generated so far) at the next step.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union, cast

import torch
import torch.distributed as dist

from megatron_r1.errors import ConfigError, UserError
from megatron_r1.inference import weights
from megatron_r1.inference.cuda_graphs import StaticDecoder
from megatron_r1.inference.functional import FunctionalGPT
from megatron_r1.inference.paged_cache import blocks_for_memory, bytes_per_token
from megatron_r1.inference.sampling import SamplingParams, sample
from megatron_r1.models.unwrap import unwrap as unwrap_model

log = logging.getLogger(__name__)


class QueueFullError(UserError):
    """The engine's waiting queue is at `max_queue`; the server answers 503."""


@dataclass
class GenerationResult:
    """One finished request: what the RL trainer and the server read."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a stop token is included; a stop string's text is cut from `text`)
    logprobs: list[float]  # log p(token) at the request's temperature: the behaviour policy (see sampling.py)
    raw_logprobs: list[float]  # log p(token) at temperature 1
    text: Optional[str]  # decoded generated text when the engine has a tokenizer
    finish_reason: str  # "stop" | "length" | "abort" | "error" (the engine step failed; see the log)
    weight_version: int  # engine weight version when the request finished
    # Engine(record_routing=True): the top-k expert ids each MoE layer (`Engine.routing_layers`) chose for every
    # token the model took as input — the prompt and every generated token but the last — int16
    # [len(prompt) + len(token_ids) - 1, moe layers, k] on the CPU; the trainer replays them (rl.router_replay).
    # A request re-prefilled (after a refit or a preemption) keeps the re-prefill's routing for its positions.
    routing: Optional[torch.Tensor] = None


@dataclass
class Request:
    """A request inside the engine (mutated only by the engine thread, except `cancelled`)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    generator: Optional[torch.Generator]
    on_update: Optional[Callable[["Request"], None]] = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: Optional[float] = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Optional[GenerationResult] = None
    # set by the engine at submission, read every step without going back to `params`
    stop_ids: frozenset = frozenset()  # stop_token_ids, and the tokenizer's EOS unless ignore_eos
    max_new: int = 0  # tokens it may generate: max_tokens, or fewer where the context ends first
    per_token_text: bool = False  # stop strings or streaming: its text is decoded and checked every token
    # recorded routing (Engine.record_routing): its last prefill's [length, layers, k], then one [layers, k] per
    # decode step
    routing_prefill: Optional[torch.Tensor] = None
    routing_steps: list = field(default_factory=list)

    def recorded_routing(self) -> Optional[torch.Tensor]:
        if self.routing_prefill is None:
            return None
        if not self.routing_steps:
            return self.routing_prefill
        return torch.cat([self.routing_prefill, torch.stack(self.routing_steps)])

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.tokens)


class Engine:
    """Generation on a Megatron GPTModel in-process; see the module docstring."""

    def __init__(self, model, tokenizer=None, max_batch_size: int = 32, max_seq_len: Optional[int] = None,
                 max_queue: int = 1024, max_prefill_tokens: int = 8192, mla_absorb: bool = True, seed: int = 0,
                 vocab_size: Optional[int] = None, cuda_graphs: bool = True, static_decode: Optional[bool] = None,
                 kv_cache: str = "auto", kv_block_size: int = 16, kv_cache_blocks: Optional[int] = None,
                 kv_cache_memory_gb: Optional[float] = None, record_routing: bool = False):
        """`cuda_graphs`: on a CUDA model, decode through CUDA graphs captured per batch/length bucket
        (`generation.cuda_graphs`); ignored elsewhere. `static_decode`: run the bucketed static-shape step without
        capture (True; how the CPU tests drive it) or force the eager step (False); None: static iff graphs.
        `vocab_size`: the real vocabulary; logits of the padding rows above it (Megatron pads the embedding to
        `vocab_pad_multiple`) are set to -inf, so those ids are never sampled and log-probs are normalised over
        the real vocabulary. None: the tokenizer's vocab_size when a tokenizer is given, else the whole padded
        vocabulary (the same normalisation as megatron_r1.ops log-probs over the model's logits).
        `kv_cache`: auto | paged | contiguous (module docstring); paged: `kv_block_size` tokens per block and a pool
        of `kv_cache_blocks` blocks, or as many as fit in `kv_cache_memory_gb` GiB, or (both None) the contiguous
        cache's most (max_batch_size x max_seq_len tokens); contiguous: grows with the requests, within
        `kv_cache_memory_gb` GiB when given (generation.kv_* fields).
        `record_routing`: keep every input token's top-k expert ids per MoE layer in each result's `routing`, for
        router replay in the trainer (rl.router_replay); an error on a model without MoE layers."""
        from megatron.core import parallel_state as ps

        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self.fn = FunctionalGPT(self.model, max_seq=max_seq_len, mla_absorb=mla_absorb)
        self.record_routing = bool(record_routing)
        self.routing_layers = self.fn.routing_layers  # decoder layers whose routing a result's `routing` holds
        # (a pipeline stage may hold only dense layers: it records an empty layer axis)
        if self.record_routing and not (self.routing_layers or (self.fn.pp_size > 1 and self.fn.cfg.num_moe_experts)):
            raise UserError("Engine(record_routing=True): the model has no MoE layers, so there is no routing to "
                            "record")
        self.fn.record_routing = self.record_routing
        # the fused CPU decode step, if it applies, is built (first time on a machine, ~20 s) or loaded now rather
        # than inside the first request
        self.fn.fused_decode_step()
        self.pp_size = self.fn.pp_size
        if self.pp_size > 1 and kv_cache == "contiguous" and kv_cache_memory_gb is not None:
            raise ConfigError("generation.kv_cache: with pipeline parallelism a memory budget needs the paged cache "
                              "(every stage must schedule alike; a contiguous cache's bytes differ per stage), set "
                              "generation.kv_cache=paged")
        self.max_seq_len = self.fn.max_seq
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self._kv_budget: Optional[int] = None  # contiguous: the cache's bytes never exceed this (kv_cache_memory_gb)
        self.cache = self._new_cache(kv_cache, kv_block_size, kv_cache_blocks, kv_cache_memory_gb)
        self.paged = self.cache.paged
        self.device = self.fn.device
        graphs = bool(cuda_graphs) and self.device.type == "cuda" and self.pp_size == 1
        static = graphs if static_decode is None else bool(static_decode) and self.pp_size == 1
        self.static_decoder = StaticDecoder(self.fn, self.cache, capture=graphs and static) if static else None
        self.weight_version = 0
        self._default_gen = torch.Generator().manual_seed(seed)
        self._ids = itertools.count()
        self._waiting: deque[Request] = deque()
        self._rows: list[Request] = []  # running requests; index = cache row
        # per cache row: the next decode's input token and its position (= the request's length - 1)
        self._last = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(self.max_batch_size, dtype=torch.long, device=self.device)
        self._lock = threading.Lock()  # guards _waiting and request submission / abort
        self._step_lock = threading.Lock()  # one scheduler step (or refit) at a time
        self._wake = threading.Condition(self._lock)
        self._thread: Optional[threading.Thread] = None
        self._stop = False
        self.eos_id = getattr(tokenizer, "eos_id", None) if tokenizer is not None else None
        if vocab_size is None and tokenizer is not None:
            vocab_size = tokenizer.vocab_size
        if vocab_size is not None and vocab_size > self.fn.vocab_size:
            raise UserError(f"vocab_size {vocab_size} exceeds the model's {self.fn.vocab_size} embedding rows")
        self.vocab_size = vocab_size if vocab_size is not None and vocab_size < self.fn.vocab_size else None
        # Broadcasts that make every rank hold the same sampled tokens (see module docstring), in order: (group,
        # source rank, run on the last pipeline stage only)
        self._syncs: list[tuple] = []
        self._replicate_over_dp = False  # expert parallelism across DP ranks: generate() gathers their requests
        if ps.is_initialized() and dist.is_initialized():
            ep = self.fn.expert_group is not None and dist.get_world_size(self.fn.expert_group) > 1
            if self.fn.tp_size > 1 and (self.pp_size > 1 or not ep):
                self._syncs.append((self.fn.tp_group, ps.get_tensor_model_parallel_src_rank(), True))
            if self.pp_size > 1:  # the last stage's tokens to the other stages of its pipeline
                self._syncs.append((self.fn.pp_group, ps.get_pipeline_model_parallel_last_rank(), False))
            if ep:  # then every rank of the model agrees with rank 0
                self._syncs.append((dist.group.WORLD, 0, False))
            self._replicate_over_dp = ep and ps.get_data_parallel_world_size() > 1
        # prompt_tokens: tokens admitted to prefill; prefill_tokens_shared: those of them not computed because an
        # identical sequence was prefilled in the same step (its cache rows copied instead: GRPO's G samples)
        self.stats = {"requests_finished": 0, "generated_tokens": 0, "prompt_tokens": 0,
                      "prefill_tokens_shared": 0, "refits": 0, "last_refit_seconds": 0.0, "failed_steps": 0,
                      "preemptions": 0, "kv_blocks_peak": 0, "kv_cache_bytes_peak": self.cache.nbytes()}

    def _new_cache(self, kind: str, block_size: int, num_blocks: Optional[int], memory_gb: Optional[float]):
        if kind not in ("auto", "paged", "contiguous"):
            raise UserError(f"generation.kv_cache must be auto, paged or contiguous, got {kind!r}")
        if kind == "auto":
            kind = "contiguous" if self.fn.fused_decode_step() is not None else "paged"
        if kind == "contiguous":
            cache = self.fn.new_cache(self.max_batch_size, grow=True)
            if memory_gb is not None:
                self._kv_budget = int(memory_gb * 2 ** 30)
                need = cache.bytes_for(1, self.max_seq_len)
                if need > self._kv_budget:
                    raise ConfigError(
                        f"generation.kv_cache_memory_gb: {memory_gb} GiB holds less than one request of the full "
                        f"context ({self.max_seq_len} tokens, {need / 2 ** 30:.3f} GiB); every request must be able "
                        "to run alone")
            log.info("contiguous KV cache: grows with the requests up to %d slots x %d positions (%.3f GiB)%s",
                     self.max_batch_size, self.max_seq_len,
                     cache.bytes_for(self.max_batch_size, self.max_seq_len) / 2 ** 30,
                     "" if self._kv_budget is None else f", within {memory_gb} GiB")
            return cache
        if num_blocks is None and memory_gb is not None:
            token_bytes = bytes_per_token(self.fn.cache_spec, self.fn.num_layers, self.fn.dtype)
            num_blocks = blocks_for_memory(memory_gb, block_size, token_bytes)
        if self.pp_size > 1 and num_blocks is not None:
            # every stage schedules alike only with the same pool: the stage with the most layers sets it
            agreed = torch.tensor([num_blocks], dtype=torch.long, device=self.fn.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            num_blocks = int(agreed)
        cache = self.fn.new_paged_cache(self.max_batch_size, block_size, num_blocks)
        log.info("paged KV cache: %d blocks of %d tokens (%.3f GiB)", cache.num_blocks - 1, block_size,
                 cache.nbytes() / 2 ** 30)
        return cache

    # ------------------------------------------------------------------------------------------ submission
    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._rows)

    def has_work(self) -> bool:
        return bool(self._waiting or self._rows)

    def add_request(self, prompt_token_ids: Sequence[int], params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None,
                    on_update: Optional[Callable[[Request], None]] = None) -> Request:
        """Queue a request (thread-safe). Raises UserError for a bad prompt, QueueFullError when the queue is full."""
        params = (params or SamplingParams()).validate()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise UserError("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise UserError(f"the prompt has {len(prompt)} tokens; the context is {self.max_seq_len} tokens "
                            "(prompt + at least one new token must fit)")
        vocab = self.vocab_size or self.fn.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise UserError(f"prompt token ids must be in [0, {vocab})")
        gen = torch.Generator().manual_seed(int(params.seed)) if params.seed is not None else None
        req = Request(request_id or f"req-{next(self._ids)}", prompt, params, gen, on_update)
        req.stop_ids = frozenset(params.stop_token_ids) | (
            {self.eos_id} if self.eos_id is not None and not params.ignore_eos else set())
        req.max_new = min(params.max_tokens, self.max_seq_len - len(prompt))
        req.per_token_text = bool(params.stop) or on_update is not None
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(req)
            self._wake.notify()
        return req

    def abort(self, req: Request) -> None:
        """Cancel a request (thread-safe); its slot is freed at the next step boundary."""
        req.cancelled = True
        with self._lock:
            self._wake.notify()

    # ------------------------------------------------------------------------------------------ stepping
    def step(self) -> list[Request]:
        """One scheduler step; returns the requests that finished in it."""
        with self._step_lock:
            finished: list[Request] = []
            self._drop_cancelled(finished)
            self._admit_and_prefill(finished)
            if self._rows:
                self._decode(finished)
            if not self._rows and not self._waiting:
                self.cache.reserve(0, 0)  # idle: a growing contiguous cache gives its memory back
            return finished

    def _drop_cancelled(self, finished):
        with self._lock:
            for req in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(req)
                self._finish(req, "abort", finished)
        for row in reversed(range(len(self._rows))):
            if self._rows[row].cancelled:
                self._finish(self._rows[row], "abort", finished, row)

    def _admit_and_prefill(self, finished):
        batch: list[Request] = []
        seen: dict[tuple, int] = {}  # sequence -> index of its first request in `batch`
        src: list[Optional[int]] = []  # per admitted request: None (prefilled) or the request it copies
        with self._lock:
            budget = self.max_prefill_tokens
            blocks = self._admission_blocks()
            longest = max((r.length for r in self._rows), default=0)  # contiguous: positions the rows must hold
            while self._waiting and len(self._rows) + len(batch) < self.max_batch_size:
                req = self._waiting[0]
                # resumed requests (after a refit or a preemption) re-prefill what they generated so far
                key = tuple(req.prompt + req.tokens)
                first = seen.get(key)
                if self.paged:  # blocks for the prompt and the first new token; a copy: its own first block
                    need = 1 if first is not None else self.cache.blocks_for(req.length + 1)
                    if need > blocks:
                        break
                    blocks -= need
                elif self._kv_budget is not None:  # the grown cache must fit; alone, a request always does
                    grown = max(longest, req.length + 1)
                    rows = len(self._rows) + len(batch) + 1
                    if rows > 1 and self.cache.bytes_for(rows, grown) > self._kv_budget:
                        break
                    longest = grown
                if first is None:  # a copy of an admitted sequence costs no prefill
                    if batch and req.length > budget:
                        break
                    budget -= req.length
                    seen[key] = len(batch)
                src.append(first)
                batch.append(self._waiting.popleft())
        if not batch:
            return
        # rows: the distinct sequences first (prefilled together), then the copies (cache rows copied); they join
        # the running rows now, so a failing prefill fails them (see _loop) instead of losing them
        uniq = [r for r, s in zip(batch, src) if s is None]
        copies = [(r, s) for r, s in zip(batch, src) if s is not None]
        row0 = len(self._rows)
        self._rows.extend(uniq + [r for r, _ in copies])
        T = max(r.length for r in uniq)
        tokens = torch.zeros(len(uniq), T, dtype=torch.long)
        for i, r in enumerate(uniq):
            ids = r.prompt + r.tokens
            tokens[i, :len(ids)] = torch.tensor(ids)
        lengths = torch.tensor([r.length for r in uniq])
        if self.paged:
            for i, r in enumerate(uniq):
                self.cache.allocate_row(row0 + i, r.length)
            self._note_blocks()
        else:  # a growing contiguous cache makes room for every row and the padded prefill (copies: <= T)
            self._reserve_rows(len(self._rows), max(T, max(r.length for r in self._rows)))
        logits = self.fn.prefill(tokens.to(self.device), lengths.to(self.device), self.cache, row0=row0)
        if self.record_routing:  # [uniq, T, layers, k]; a copy's prompt was routed as its source's
            routing = cast(torch.Tensor, self.fn.last_routing).cpu()
            for i, r in enumerate(uniq):
                r.routing_prefill, r.routing_steps = routing[i, :r.length], []
            for r, s in copies:
                r.routing_prefill, r.routing_steps = batch[s].routing_prefill, []
        if copies:
            u_row = {id(r): i for i, r in enumerate(uniq)}
            from_u = torch.tensor([u_row[id(batch[s])] for _, s in copies], device=self.device)
            dst = torch.arange(row0 + len(uniq), row0 + len(batch), device=self.device)
            self.cache.copy_rows(from_u + row0, dst, T)
            if logits is not None:  # None on a pipeline stage other than the last
                logits = torch.cat([logits, logits[from_u]])
            lengths = torch.cat([lengths, lengths[from_u.cpu()]])
            self.stats["prefill_tokens_shared"] += sum(r.length for r, _ in copies)
        batch = self._rows[row0:]
        self.stats["prompt_tokens"] += sum(r.length for r in batch)
        self._pos[row0:row0 + len(batch)] = lengths.to(self.device)  # the sampled token's position
        now = time.monotonic()
        for r in batch:
            if r.first_token_time is None:
                r.first_token_time = now
        self._sample_and_advance(logits, row0, row0 + len(batch), finished)

    def _admission_blocks(self) -> int:
        """Blocks admission may hand out now: the free ones less a watermark (1% of the pool, at least one) kept for
        the running requests' growth, so a new admission is not preempted at once. With nothing running there is
        no growth to keep blocks for: the whole pool is admissible (the pool holds at least one full context), so
        a request always starts — a watermark there would leave a one-context pool admitting nothing, forever."""
        if not self.paged:
            return 0
        reserve = max(1, (self.cache.num_blocks - 1) // 100) if self._rows else 0
        return self.cache.num_free - reserve

    def _reserve_rows(self, rows: int, seq: int):
        """Grow the contiguous cache to `rows` rows of `seq` positions (if it holds fewer) and note its peak."""
        self.cache.reserve(rows, seq)
        self.stats["kv_cache_bytes_peak"] = max(self.stats["kv_cache_bytes_peak"], self.cache.nbytes())

    def _fit_budget(self):
        """Contiguous cache with a budget: preempt the newest requests while the rows' next step would need a
        cache past it (the longest row crossing a position bucket); the oldest always runs."""
        budget = cast(int, self._kv_budget)
        while len(self._rows) > 1:
            if self.cache.bytes_for(len(self._rows), max(r.length for r in self._rows)) <= budget:
                return
            row = max(range(len(self._rows)), key=lambda i: (self._rows[i].arrival, i))
            self._preempt(row, 0)

    def _note_blocks(self):
        self.stats["kv_blocks_peak"] = max(self.stats["kv_blocks_peak"], self.cache.pool.num_used)

    def _reserve_decode_blocks(self):
        """Give every running row a writable block for its next position (new, or a private copy of a shared
        one); where the pool has too few free blocks, preempt the newest requests first (module docstring)."""
        cache = self.cache
        while self._rows:
            need = [row for row, r in enumerate(self._rows) if cache.needs_block(row, r.length - 1)]
            if len(need) <= cache.num_free:
                break
            row = max(range(len(self._rows)), key=lambda i: (self._rows[i].arrival, i))
            self._preempt(row, len(need))
        if not self._rows:
            return
        for row in need:
            cache.prepare_write(row, self._rows[row].length - 1)
        self._note_blocks()

    def _preempt(self, row: int, needed: int):
        req = self._rows[row]
        self._remove_row(row)
        with self._lock:  # the front of the queue, behind older preempted requests (arrival order)
            i = 0
            while i < len(self._waiting) and self._waiting[i].arrival <= req.arrival:
                i += 1
            self._waiting.insert(i, req)
        self.stats["preemptions"] += 1
        level = logging.WARNING if self.stats["preemptions"] == 1 else logging.INFO
        if self.paged:
            full = (f"KV cache pool full ({self.cache.num_blocks - 1} blocks of {self.cache.block_size} tokens, "
                    f"{self.cache.num_free} free, {needed} needed)")
        else:
            gib = (self._kv_budget or 0) / 2 ** 30
            full = f"KV cache budget reached ({gib:.3f} GiB, generation.kv_cache_memory_gb)"
        log.log(level, "%s: preempted %s (%d tokens cached); it resumes by recompute when memory frees up "
                "(%d preemptions so far)", full, req.request_id, req.length, self.stats["preemptions"])

    def _decode(self, finished):
        if self.paged:
            self._reserve_decode_blocks()
            if not self._rows:
                return
            self.cache.sync()
        elif self._kv_budget is not None:
            self._fit_budget()
        n = len(self._rows)
        longest = max(r.length for r in self._rows)  # this step writes position length - 1 of each row
        logits: Optional[torch.Tensor]  # None on a pipeline stage other than the last
        if self.static_decoder is not None:  # positions attended: each row's length, known here without a sync
            logits = self.static_decoder(self._last[:n], self._pos[:n], longest)  # it grows the cache to its bucket
            self.stats["kv_cache_bytes_peak"] = max(self.stats["kv_cache_bytes_peak"], self.cache.nbytes())
        else:
            if not self.paged:
                self._reserve_rows(n, longest)
            logits = self.fn.decode(self._last[:n], self._pos[:n], self.cache)
        self._pos.add_(1)  # rows >= n are free: their positions are set when a prefill fills them
        routing = cast(torch.Tensor, self.fn.last_routing)[:n] if self.record_routing else None
        self._sample_and_advance(logits, 0, n, finished, routing)

    def _sample_and_advance(self, logits, r0: int, r1: int, finished, routing: Optional[torch.Tensor] = None):
        """Sample a token for rows r0..r1-1, append it to their requests, finish those that stop. `routing`
        [r1 - r0, layers, k]: the decode step's expert ids for the tokens these rows took as input."""
        reqs = self._rows[r0:r1]
        tokens, lp, raw = self._sample(logits, reqs)
        self._last[r0:r1] = tokens
        # one device sync per step, not one per value; the loop below is the only per-request work of a step
        toks, lps = tokens.tolist(), lp.tolist()
        raws = lps if raw is lp else raw.tolist()
        steps = routing.cpu().unbind(0) if routing is not None else None
        done_rows = []
        for j, req in enumerate(reqs):
            if steps is not None:
                req.routing_steps.append(steps[j])
            t = toks[j]
            req.tokens.append(t)
            req.logprobs.append(lps[j])
            req.raw_logprobs.append(raws[j])
            reason = self._stop_reason(req, t)
            if reason is not None:
                done_rows.append((r0 + j, reason))
            elif req.on_update is not None:
                req.on_update(req)
        self.stats["generated_tokens"] += r1 - r0
        for row, reason in reversed(done_rows):  # highest row first keeps lower rows valid
            self._finish(self._rows[row], reason, finished, row)

    def _sample(self, logits: Optional[torch.Tensor], reqs: list[Request]):
        """Tokens, log-probs at the request's temperature and at 1 for `reqs`, the same on every rank: sampled
        from `logits` on the last pipeline stage (the others get None), then broadcast (`_syncs`)."""
        if logits is not None:
            if self.vocab_size is not None:
                logits = logits[:, :self.vocab_size]  # padding rows of the embedding are not tokens
            tokens, lp, raw = sample(logits, [r.params for r in reqs], [r.generator for r in reqs],
                                     self._default_gen)
            if not self._syncs:
                return tokens, lp, raw
            packed = torch.stack([tokens.double(), lp.double(), raw.double()])
        else:
            packed = torch.empty(3, len(reqs), dtype=torch.float64, device=self.device)
        for group, src, last_stage_only in self._syncs:
            if last_stage_only and not self.fn.last_stage:
                continue
            dist.broadcast(packed, src=src, group=group)
        return packed[0].long(), packed[1], packed[2]

    def _stop_reason(self, req: Request, token: int) -> Optional[str]:
        """Why `req` stops after `token`, or None. Its text is decoded every token only when something reads it
        every token (stop strings, streaming: `per_token_text`); otherwise once, when it ends (per-token decoding
        was ~4% of a GRPO step)."""
        if token in req.stop_ids:
            self._update_text(req, drop_last=token == self.eos_id)
            return "stop"
        if req.per_token_text:
            self._update_text(req)
            p = req.params
            if p.stop and self.tokenizer is not None:
                for s in p.stop:
                    cut = req.text.find(s)
                    if cut >= 0:
                        req.text = req.text[:cut]
                        return "stop"
        if len(req.tokens) >= req.max_new:
            if not req.per_token_text:
                self._update_text(req)
            return "length"
        return None

    def _update_text(self, req: Request, drop_last: bool = False):
        if self.tokenizer is None:
            return
        ids = req.tokens[:-1] if drop_last else req.tokens
        req.text = self.tokenizer.decode(ids)

    def _remove_row(self, row: int):
        """Free `row`'s cache (paged: its blocks) and move the last running row into it."""
        self.cache.release_row(row)
        last = len(self._rows) - 1
        if row != last:
            moved = self._rows[last]
            self.cache.move_row(last, row, moved.length)
            self._last[row] = self._last[last]
            self._pos[row] = self._pos[last]
            self._rows[row] = moved
        self._rows.pop()

    def _finish(self, req: Request, reason: str, finished: list, row: Optional[int] = None):
        if row is not None:
            self._remove_row(row)
        req.finish_reason = reason
        if reason in ("abort", "error"):
            self._update_text(req)  # the text so far (stop/length finishes have just decoded it)
        req.result = GenerationResult(req.request_id, req.prompt, list(req.tokens), list(req.logprobs),
                                      list(req.raw_logprobs), req.text if self.tokenizer is not None else None,
                                      reason, self.weight_version, req.recorded_routing())
        self.stats["requests_finished"] += 1
        finished.append(req)
        req.done.set()
        if req.on_update is not None:
            req.on_update(req)

    # ------------------------------------------------------------------------------------------ batch API
    def generate(self, prompts_token_ids: Sequence[Sequence[int]],
                 sampling: Union[SamplingParams, Sequence[SamplingParams], None] = None) -> list[GenerationResult]:
        """Generate for every prompt (same order) through the continuous-batching scheduler.

        The ranks of one model replica (its TP group and pipeline stages) call this with the same arguments and get
        the same results. With expert parallelism each data-parallel rank may pass its own prompts: the experts'
        outputs are all-reduced over ranks of different replicas, so every rank must run the same tokens; the
        requests of all DP ranks are gathered, every rank generates all of them, and each gets its own back (when
        every rank passed the same requests, they run once and every rank gets all of them). That
        costs each rank the attention of every DP rank's requests (the experts stay sharded): a generator that
        dispatches tokens to their experts (all-to-all) instead of replicating them would not.
        """
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts_token_ids)
        if len(sampling) != len(prompts_token_ids):
            raise UserError(f"{len(sampling)} SamplingParams for {len(prompts_token_ids)} prompts")
        if self._replicate_over_dp:
            return self._generate_every_dp_rank(prompts_token_ids, sampling)
        return self._generate(prompts_token_ids, sampling)

    def _generate_every_dp_rank(self, prompts_token_ids, sampling) -> list[GenerationResult]:
        """`generate` under expert parallelism: all DP ranks' requests on every rank, in DP-rank order."""
        from megatron.core import parallel_state as ps

        mine = ([list(map(int, p)) for p in prompts_token_ids], list(sampling))
        everyone: list = [None] * dist.get_world_size()
        key = (ps.get_data_parallel_rank(), ps.get_tensor_model_parallel_rank(),
               ps.get_pipeline_model_parallel_rank())
        dist.all_gather_object(everyone, (key, mine))
        by_dp: dict = {}
        for (dp, _tp, _pp), part in sorted(everyone, key=lambda e: e[0]):
            by_dp.setdefault(dp, part)  # a replica's TP peers and stages passed the same requests
        parts = list(by_dp.values())
        if all(part == parts[0] for part in parts[1:]):  # every rank passed the same requests: run them once
            return self._generate(prompts_token_ids, sampling)
        prompts: list[list[int]] = []
        params: list[SamplingParams] = []
        start = 0
        for dp, (p, sp) in sorted(by_dp.items()):
            if dp == key[0]:
                start = len(prompts)
            prompts += p
            params += sp
        results = self._generate(prompts, params)
        return results[start:start + len(prompts_token_ids)]

    def _generate(self, prompts_token_ids, sampling) -> list[GenerationResult]:
        reqs = []
        for ids, sp in zip(prompts_token_ids, sampling):
            while True:
                try:
                    reqs.append(self.add_request(ids, sp))
                    break
                except QueueFullError:
                    if self._thread is None:
                        self.step()  # make room by running the scheduler ourselves
                    else:
                        time.sleep(0.001)
        if self._thread is not None:
            for r in reqs:
                r.done.wait()
        else:
            while not all(r.done.is_set() for r in reqs):
                self.step()
        return [cast(GenerationResult, r.result) for r in reqs]  # `done` is set only after `result` is

    # ------------------------------------------------------------------------------------------ refit
    def refit(self, source=None) -> float:
        """Serve new weights from now on; returns the seconds it took.

        `source`: None or the engine's own model (parameters shared with the trainer: nothing to copy); another
        model with the same layout (parameters copied in memory); or a full, unsharded state dict (e.g.
        `weights.full_state_dict(trainer_model)`), sliced into this rank's TP/EP shards and copied.
        Caches are invalidated: running requests are re-prefilled on the new weights.
        """
        t0 = time.perf_counter()
        with self._step_lock:
            if source is not None:
                src = unwrap_model(source) if isinstance(source, torch.nn.Module) else source
                if src is not self.model:
                    if isinstance(src, torch.nn.Module):
                        weights.copy_same_layout(src, self.model)
                    else:
                        weights.load_full_state_dict(self.model, src)
            self.fn.refresh()  # parameter references again, in case modules or Parameters were replaced
            if self.static_decoder is not None:
                self.static_decoder.invalidate_if_moved()  # graphs hold parameter addresses
            self.weight_version += 1
            # the cached K/V (latents) came from the old weights: re-prefill running requests, oldest first
            with self._lock:
                self._waiting.extendleft(reversed(self._rows))
            self._rows = []
            self.cache.release_all()
        dt = time.perf_counter() - t0
        self.stats["refits"] += 1
        self.stats["last_refit_seconds"] = dt
        return dt

    # ------------------------------------------------------------------------------------------ background loop
    def start(self) -> None:
        """Run the scheduler in a background thread (the HTTP server's mode)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="megatron-r1-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread; unfinished requests are aborted."""
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._step_lock:
            for r in list(self._waiting) + list(self._rows):
                r.cancelled = True
            self._drop_cancelled([])

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._waiting or self._rows):
                    self._wake.wait(timeout=1.0)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a failed step must not hang every waiting client
                log.exception("engine step failed; failing the requests in flight")
                self.stats["failed_steps"] += 1
                with self._step_lock:
                    with self._lock:
                        failed = list(self._waiting) + self._rows
                        self._waiting.clear()
                    self._rows = []
                    self.cache.release_all()
                    for r in failed:
                        self._finish(r, "error", [])
