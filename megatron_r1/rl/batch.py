"""The typed seams of the RL loop: a batch of rollouts, and its padded tensor form for the trainer."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

# shared_prefix_mask: re-exported (it was defined here)
from megatron_r1.models.prefix_attention import is_segment_mask, segment_mask, shared_prefix_mask  # noqa: F401


@dataclass
class RolloutBatch:
    """G answers for each of B prompts (each group contiguous), with what the rollout side knows about them."""

    prompt_tokens: list  # [N] lists of token ids (the templated prompt), repeated for each answer of a group
    response_tokens: list  # [N] lists of sampled token ids (stop token included when one was sampled)
    behavior_logprobs: list  # [N] lists: the engine's log-prob of each sampled token (behaviour policy)
    texts: list  # [N] decoded responses
    samples: list  # [N] dataset rows (prompt, answer, ...) for the rewards
    finish_reasons: list  # [N] "stop" | "length"
    group_size: int
    rewards: Optional[torch.Tensor] = None  # [N] weighted total
    components: dict = field(default_factory=dict)  # reward name -> [N] values
    advantages: Optional[torch.Tensor] = None  # [N]
    # MoE router replay: [N] int16 tensors [len(prompt) + len(response) - 1, layers, k], the engine's top-k expert
    # ids for every token the model took as input (GenerationResult.routing), for the decoder layers
    # `routing_layers`; None when the engine did not record routing
    routing: Optional[list] = None
    routing_layers: tuple = ()

    def __len__(self) -> int:
        return len(self.response_tokens)

    def sequence_tokens(self) -> int:
        """Prompt + response tokens summed over the answers, each answer's own sequence (not padded or packed
        rows): what an update over this batch processes, the same with and without `rl.shared_prefix`."""
        return sum(len(p) + len(r) for p, r in zip(self.prompt_tokens, self.response_tokens))

    def select(self, idx: list) -> "RolloutBatch":
        """The answers at `idx` (whole groups, for dynamic sampling)."""
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return RolloutBatch(
            prompt_tokens=pick(self.prompt_tokens), response_tokens=pick(self.response_tokens),
            behavior_logprobs=pick(self.behavior_logprobs), texts=pick(self.texts), samples=pick(self.samples),
            finish_reasons=pick(self.finish_reasons), group_size=self.group_size,
            rewards=None if self.rewards is None else self.rewards[idx],
            components={k: [v[i] for i in idx] for k, v in self.components.items()},
            advantages=None if self.advantages is None else self.advantages[idx],
            routing=None if self.routing is None else pick(self.routing), routing_layers=self.routing_layers,
        )

    @staticmethod
    def concat(parts: list) -> "RolloutBatch":
        first = parts[0]
        cat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        return RolloutBatch(
            prompt_tokens=cat("prompt_tokens"), response_tokens=cat("response_tokens"),
            behavior_logprobs=cat("behavior_logprobs"), texts=cat("texts"), samples=cat("samples"),
            finish_reasons=cat("finish_reasons"), group_size=first.group_size,
            rewards=None if first.rewards is None else torch.cat([p.rewards for p in parts]),
            components={k: [x for p in parts for x in p.components[k]] for k in first.components},
            advantages=None if first.advantages is None else torch.cat([p.advantages for p in parts]),
            routing=None if first.routing is None else cat("routing"), routing_layers=first.routing_layers,
        )


@dataclass
class PolicyBatch:
    """Padded tensors for the trainer. Each row is one answer's prompt + response, right-padded; or, in shared-prefix
    rows (`collate_shared_prefix`), one group: its prompt once, then its answers. Response-aligned tensors [N, R]
    index the response tokens only (R = longest response, one row per answer either way), so losses see answers,
    never prompts. Lengths and slices count answers."""

    tokens: torch.Tensor  # [rows, S] model input (sequence without its last token)
    labels: Optional[torch.Tensor]  # [rows, S] next tokens; None in shared-prefix rows (see response_labels)
    position_ids: torch.Tensor  # [rows, S]
    response_index: torch.Tensor  # [N, R] column of the hidden state that predicts each response token
    response_mask: torch.Tensor  # [N, R] 1.0 for real response tokens
    advantages: torch.Tensor  # [N]
    behavior_logprobs: torch.Tensor  # [N, R]
    old_logprobs: Optional[torch.Tensor] = None  # [N, R] filled by the trainer's recompute
    ref_logprobs: Optional[torch.Tensor] = None  # [N, R] from the frozen reference model
    # None = causal; shared-prefix rows: their segment mask [rows, 1, 1, S] (models.prefix_attention.segment_mask:
    # O(S), expanded to the dense [rows, 1, S, S] boolean mask, True = masked, only where a layer needs it)
    attention_mask: Optional[torch.Tensor] = None
    response_labels: Optional[torch.Tensor] = None  # [N, R] the response tokens (targets), shared-prefix rows
    answers_per_row: int = 1  # G in shared-prefix rows: answer i lives in row i // answers_per_row
    row_lengths: Optional[torch.Tensor] = None  # [rows] input columns holding real tokens (the rest is padding)
    pad_multiple: int = 1  # the input length stays a multiple of this (sequence parallelism splits it)
    # a micro-batch's weight in its mini-batch's loss (set by rl.policy_forward.micro_batches): its share of the
    # aggregation's units (tokens / answers) × the number of micro-batches, which the schedule divides by
    loss_scale: float = 1.0
    # router replay: [rows, S, layers, k] int16 recorded expert ids of each input column (-1: none, e.g. padding),
    # for the decoder layers `routing_layers` (models.router_replay); None without a record
    routing: Optional[torch.Tensor] = None
    routing_layers: tuple = ()

    ROW_FIELDS = ("tokens", "labels", "position_ids", "attention_mask", "row_lengths", "routing")

    def __len__(self) -> int:
        return self.response_index.shape[0]

    @property
    def segments(self) -> Optional[torch.Tensor]:
        """[rows, S] of shared-prefix rows (0 prompt, j answer j, -1 padding): a view of their segment mask;
        None for causal rows."""
        m = self.attention_mask
        return m[:, 0, 0] if m is not None and is_segment_mask(m) else None

    def rows(self, answers: int) -> int:
        """How many rows hold `answers` answers (the schedule's micro-batch size)."""
        return -(-answers // self.answers_per_row)

    def slice(self, start: int, end: int) -> "PolicyBatch":
        """Answers start..end-1; in shared-prefix rows both ends must fall on group boundaries."""
        k = self.answers_per_row
        end = min(end, len(self))
        if start % k or end % k:
            raise ValueError(f"PolicyBatch.slice({start}, {end}): shared-prefix rows hold {k} answers each; slices "
                             f"must cover whole groups")
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor):
                out[f.name] = t[start // k: end // k] if f.name in self.ROW_FIELDS else t[start:end]
        return dataclasses.replace(self, **out)

    def take(self, rows: list) -> "PolicyBatch":
        """The rows at `rows` (any order) with their answers: how token-budget micro-batches regroup a batch."""
        k = self.answers_per_row
        row_idx = torch.as_tensor(rows, dtype=torch.long)
        ans_idx = (row_idx[:, None] * k + torch.arange(k)[None, :]).reshape(-1)
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if isinstance(t, torch.Tensor):
                out[f.name] = t[row_idx] if f.name in self.ROW_FIELDS else t[ans_idx]
        return dataclasses.replace(self, **out)

    def padded_lengths(self) -> torch.Tensor:
        """[rows] input columns each row needs (its real tokens); the width of the batch is what it pays."""
        if self.row_lengths is not None:
            return self.row_lengths
        return torch.full((self.tokens.shape[0],), self.tokens.shape[1], dtype=torch.long)

    def trimmed(self) -> "PolicyBatch":
        """The same batch without the padding columns no row of it needs: inputs cut to the longest row (rounded
        up to `pad_multiple`), response tensors to the longest response. Causal and shared-prefix attention both
        read only earlier columns, so every kept position's log-prob is unchanged."""
        s = self.tokens.shape[1]
        if self.row_lengths is not None and len(self.row_lengths):
            s = min(s, _padded_length(max(1, int(self.row_lengths.max())), self.pad_multiple))
        r = max(1, int(self.response_mask.sum(-1).max())) if len(self) else self.response_mask.shape[1]
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, torch.Tensor) or f.name == "row_lengths":
                continue
            if f.name == "attention_mask":
                out[f.name] = t[..., :s] if is_segment_mask(t) else t[..., :s, :s]
            elif f.name in self.ROW_FIELDS:
                out[f.name] = t[:, :s]
            else:
                out[f.name] = t[:, :r] if t.dim() == 2 else t
        return dataclasses.replace(self, **out)

    def to(self, device) -> "PolicyBatch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def _response_tensors(rollouts: RolloutBatch, max_response: Optional[int]):
    """The response-aligned [N, R] tensors both layouts share: mask, behaviour log-probs, targets."""
    n = len(rollouts)
    r_len = max(1, max(len(r) for r in rollouts.response_tokens))
    if max_response is not None:
        r_len = max(r_len, max_response)
    mask = torch.zeros((n, r_len), dtype=torch.float32)
    behav = torch.zeros((n, r_len), dtype=torch.float32)
    targets = torch.zeros((n, r_len), dtype=torch.long)
    for i, (r, lp) in enumerate(zip(rollouts.response_tokens, rollouts.behavior_logprobs)):
        k = len(r)
        mask[i, :k] = 1.0
        targets[i, :k] = torch.tensor(list(r), dtype=torch.long)
        if lp:
            behav[i, :k] = torch.tensor(lp[:k], dtype=torch.float32)
    adv = rollouts.advantages if rollouts.advantages is not None else torch.zeros(n)
    return mask, behav, targets, adv.float()


def _padded_length(longest: int, multiple: int) -> int:
    return -(-longest // multiple) * multiple


def collate(rollouts: RolloutBatch, pad_id: int, max_response: Optional[int] = None,
            pad_multiple: int = 1) -> PolicyBatch:
    """Pad prompt+response sequences; build the response index/mask used to gather per-token log-probs.
    `pad_multiple`: the model input's length is padded to a multiple of it (sequence parallelism splits it)."""
    n = len(rollouts)
    mask, behav, _, adv = _response_tensors(rollouts, max_response)
    seqs = [list(p) + list(r) for p, r in zip(rollouts.prompt_tokens, rollouts.response_tokens)]
    s_len = _padded_length(max(len(x) for x in seqs) - 1, pad_multiple) + 1
    full = torch.full((n, s_len), pad_id, dtype=torch.long)
    index = torch.zeros(mask.shape, dtype=torch.long)
    for i, (p, seq) in enumerate(zip(rollouts.prompt_tokens, seqs)):
        full[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        k = len(seq) - len(p)
        # Label column j holds token j+1: response token t (at sequence index len(p)+t) is label column len(p)+t-1.
        index[i, :k] = torch.arange(len(p) - 1, len(p) - 1 + k)
    tokens, labels = full[:, :-1].contiguous(), full[:, 1:].contiguous()
    pos = torch.arange(s_len - 1).unsqueeze(0).expand(n, -1).contiguous()
    lengths = torch.tensor([len(x) - 1 for x in seqs], dtype=torch.long)
    routing = None
    if rollouts.routing is not None:  # each answer's record covers its input columns 0..len(seq)-2
        routing = _routing_rows([[(rec, 0, len(seq) - 1)] for rec, seq in zip(rollouts.routing, seqs)],
                                s_len - 1, rollouts.routing)
    return PolicyBatch(tokens, labels, pos, index, mask, adv, behav, row_lengths=lengths, pad_multiple=pad_multiple,
                       routing=routing, routing_layers=tuple(rollouts.routing_layers))


def _routing_rows(rows: list, width: int, records: list) -> Optional[torch.Tensor]:
    """[rows, width, layers, k] int16 of -1, each row filled from its pieces (record, first, count): the record's
    positions first..first+count-1, one after another from column 0. A record shorter than its piece (an aborted
    request) leaves the rest at -1 (those tokens route by themselves)."""
    ref = next((r for r in records if r is not None), None)
    if ref is None:
        return None
    out = torch.full((len(rows), width, *ref.shape[1:]), -1, dtype=torch.int16)
    for i, pieces in enumerate(rows):
        col = 0
        for rec, first, count in pieces:
            if rec is not None:
                got = max(0, min(count, rec.shape[0] - first))
                out[i, col:col + got] = rec[first:first + got]
            col += count
    return out


def collate_shared_prefix(rollouts: RolloutBatch, pad_id: int, max_response: Optional[int] = None,
                          pad_multiple: int = 1) -> PolicyBatch:
    """One row per group: [prompt (P tokens), answer_1, ..., answer_G], the prompt computed once instead of G times.

    Answer tokens take positions P, P+1, ... (as if each followed the prompt alone) and see the prompt and their own
    past only (`shared_prefix_mask`; handed to the model as the O(S) `segment_mask`), so every answer's log-probs
    equal those of `collate`'s row prompt + answer.
    An answer's last token is only a target, so it is not an input. Every answer's first token is predicted from
    the same column (P-1), which is why targets are stored per answer token (`response_labels`), not as one labels
    column. Rows need a model whose rotary embeddings follow `position_ids` (`megatron_r1.models.positions`).
    `pad_multiple` as in `collate`. One thing does change: MoE routers see each prompt token once, so the
    aux-loss-free balancing (expert bias update) counts prompt tokens once instead of G times; and with router
    replay the prompt's recorded routing is the group's first answer's (the engine prefills a group's prompt once
    when its answers are admitted together, so all G records agree; otherwise the first one's is replayed).
    """
    g, n = rollouts.group_size, len(rollouts)
    if n % g:
        raise ValueError(f"collate_shared_prefix: {n} answers are not whole groups of {g}")
    mask, behav, targets, adv = _response_tensors(rollouts, max_response)
    index = torch.zeros(mask.shape, dtype=torch.long)
    rows = []  # (tokens, positions, segments) per group
    routed: list = []  # the record pieces of each row (see _routing_rows)
    for start in range(0, n, g):
        prompt = list(rollouts.prompt_tokens[start])
        if not prompt:
            raise ValueError("collate_shared_prefix: an empty prompt has no position to predict the first token from")
        if any(list(rollouts.prompt_tokens[i]) != prompt for i in range(start + 1, start + g)):
            raise ValueError(f"collate_shared_prefix: the answers {start}..{start + g - 1} of one group have "
                             f"different prompts")
        p = len(prompt)
        toks, pos, seg = list(prompt), list(range(p)), [0] * p
        for j in range(g):
            r = list(rollouts.response_tokens[start + j])
            inputs = r[:-1]
            first = len(toks)
            # Token 0 is predicted from the prompt's last column; token t >= 1 from the column of token t-1.
            if r:
                index[start + j, : len(r)] = torch.tensor([p - 1] + list(range(first, first + len(inputs))))
            toks += inputs
            pos += range(p, p + len(inputs))
            seg += [j + 1] * len(inputs)
        rows.append((toks, pos, seg))
        if rollouts.routing is not None:  # the prompt's record, then each answer's input tokens' records
            routed.append([(rollouts.routing[start], 0, p)] + [
                (rollouts.routing[start + j], p, max(0, len(rollouts.response_tokens[start + j]) - 1))
                for j in range(g)])
    s_len = _padded_length(max(len(t) for t, _, _ in rows), pad_multiple)
    tokens = torch.full((len(rows), s_len), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), s_len), dtype=torch.long)
    segments = torch.full((len(rows), s_len), -1, dtype=torch.long)
    for i, (t, ps, sg) in enumerate(rows):
        tokens[i, : len(t)] = torch.tensor(t)
        positions[i, : len(t)] = torch.tensor(ps)
        segments[i, : len(t)] = torch.tensor(sg)
    routing = _routing_rows(routed, s_len, rollouts.routing) if rollouts.routing is not None else None
    return PolicyBatch(tokens, None, positions, index, mask, adv, behav, attention_mask=segment_mask(segments),
                       response_labels=targets, answers_per_row=g,
                       row_lengths=torch.tensor([len(t) for t, _, _ in rows], dtype=torch.long),
                       pad_multiple=pad_multiple, routing=routing, routing_layers=tuple(rollouts.routing_layers))
