"""SFT samples -> padded rows with a response-only target mask.

One sample per row, padded to `seq_length + 1` (documented choice: padding rather than packing keeps attention
inside each sample without needing varlen attention kernels; the cost is pad compute, small for R1-style CoT
whose lengths cluster). Samples longer than the row are cut at the end and counted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_r1.errors import DataError


def response_text(sample: dict, where: str = "") -> str:
    """The target text: `completion` (or `response`), else built from a worked `solution` and the `answer`."""
    for key in ("completion", "response"):
        if isinstance(sample.get(key), str) and sample[key].strip():
            return sample[key]
    if isinstance(sample.get("solution"), str) and sample.get("answer") is not None:
        return f" <think> {sample['solution'].strip()} </think> <answer> {sample['answer']} </answer>"
    raise DataError(f"{where or 'sample ' + str(sample.get('id', '?'))}: no `completion`/`response`, nor "
                    f"`solution` + `answer`, to train on")


@dataclass
class SFTRows:
    tokens: torch.Tensor  # [n, seq_length + 1]
    target_mask: torch.Tensor  # [n, seq_length + 1] True on response tokens (and the closing EOS)
    truncated: int


def build_sft_rows(samples: list[dict], tokenizer, template, seq_length: int) -> SFTRows:
    width = seq_length + 1
    tokens = torch.full((len(samples), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    truncated = 0
    for i, s in enumerate(samples):
        prompt = tokenizer.encode(template.format(s["prompt"]))
        resp = tokenizer.encode(response_text(s, f"sample {s.get('id', i)}")) + [tokenizer.eos_id]
        ids = (prompt + resp)[:width]
        truncated += int(len(prompt) + len(resp) > width)
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[i, len(prompt): len(ids)] = True
    return SFTRows(tokens, mask, truncated)
