"""`preview`: what a user checks before launching: a few samples with the template applied, and counts."""
from __future__ import annotations

from collections import Counter

from megatron_r1.data.loading import load_dataset
from megatron_r1.data.templates import get_template
from megatron_r1.data.tokenizer import load_tokenizer


def preview(source: str, template: str = "r1_zero", n: int = 3, field_map: dict | None = None, split: str = "train",
            skip_bad_rows: bool = False, tokenizer: str | None = None, **options) -> str:
    """A printable report: counts (rows, skipped, fields, languages, prompt lengths) and `n` formatted samples."""
    samples = load_dataset(source, field_map, split=split, skip_bad_rows=skip_bad_rows, **options)
    tmpl = get_template(template)
    report = samples.report
    fields = Counter(k for s in samples for k in s)
    lengths = sorted(len(tmpl.format(s["prompt"])) for s in samples)
    lines = [f"source: {source} (split {split})",
             f"samples: {report.loaded}" + (f", skipped bad rows: {report.skipped}" if report.skipped else ""),
             "fields: " + ", ".join(f"{k} {v}" for k, v in sorted(fields.items())),
             f"formatted prompt chars ({template}): min {lengths[0]}, median {lengths[len(lengths) // 2]}, "
             f"max {lengths[-1]}"]
    if tokenizer:
        tok = load_tokenizer(tokenizer)
        ntok = sorted(len(tok.encode(tmpl.format(s["prompt"]))) for s in samples)
        lines.append(f"formatted prompt tokens ({tokenizer}): min {ntok[0]}, median {ntok[len(ntok) // 2]}, "
                     f"max {ntok[-1]}")
    languages = Counter(s["language"] for s in samples if "language" in s)
    if languages:
        lines.append("languages: " + ", ".join(f"{k} {v}" for k, v in sorted(languages.items())))
    for reason in report.reasons[:3]:
        lines.append(f"skipped: {reason}")
    for i, s in enumerate(samples[:n]):
        lines += ["", f"--- sample {i} (id {s.get('id', i)}) ---", tmpl.format(s["prompt"])]
        for key in ("answer", "language", "solution", "completion"):
            if key in s:
                lines.append(f"[{key}] {s[key]}")
    return "\n".join(lines)
