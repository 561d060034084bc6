"""Evaluation as the R1 report does it: pass@1 averaged over k samples per problem, cons@k (majority vote over
the extracted answers), response length and format rate. `megatron-r1 eval --load CKPT --dataset SRC --k 16`."""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Optional

from megatron_r1.config import load_config
from megatron_r1.data import load_dataset
from megatron_r1.errors import CheckpointError
from megatron_r1.models import build_model
from megatron_r1.rewards import extract_answer, get_reward
from megatron_r1.rewards.accuracy import normalize


def score_samples(texts: list[str], samples: list[dict], response_lengths: list[int], k: int,
                  accuracy_fn=None, format_fn=None) -> dict:
    """Metrics from k completions per problem (problem i owns texts[i*k:(i+1)*k])."""
    accuracy_fn = accuracy_fn or get_reward("accuracy")
    format_fn = format_fn or get_reward("format")
    acc = accuracy_fn(texts, samples)
    fmt = format_fn(texts, samples)
    n = len(texts) // k
    pass1, cons = [], []
    for i in range(n):
        block = range(i * k, (i + 1) * k)
        pass1.append(sum(acc[j] for j in block) / k)
        answers = [(normalize(a), j) for j in block if (a := extract_answer(texts[j])) is not None and a.strip()]
        if not answers:
            cons.append(0.0)
            continue
        counts = Counter(a for a, _ in answers)
        best = max(counts.values())
        # Ties go to the answer that appeared first, so the vote does not depend on set ordering.
        winner = next(a for a, _ in answers if counts[a] == best)
        rep = next(j for a, j in answers if a == winner)
        cons.append(float(acc[rep] > 0.5))
    return {
        "pass@1": sum(pass1) / max(1, n),
        f"cons@{k}": sum(cons) / max(1, n),
        "format": sum(fmt) / max(1, len(fmt)),
        "mean_length": sum(response_lengths) / max(1, len(response_lengths)),
        "num_problems": n,
        "k": k,
    }


def evaluate(engine, tokenizer, template, samples: list[dict], k: int, gen_cfg, max_new_tokens: int, seed: int = 0,
             temperature: Optional[float] = None, batch_problems: int = 32) -> dict:
    """Sample k answers per problem with the engine and score them."""
    from megatron_r1.rl.rollout import sample_group_rollouts

    texts, rows, lengths = [], [], []
    for start in range(0, len(samples), batch_problems):
        chunk = samples[start:start + batch_problems]
        batch = sample_group_rollouts(engine, tokenizer, template, chunk, k, gen_cfg, max_new_tokens,
                                      seed + start, temperature=temperature)
        texts += batch.texts
        rows += batch.samples
        lengths += [len(r) for r in batch.response_tokens]
    return score_samples(texts, rows, lengths, k)


def main(argv: list[str]) -> int:
    from megatron_r1.checkpoint import latest_checkpoint, load_model_only
    from megatron_r1.inference import Engine
    from megatron_r1.training.prologue import start_stage  # torch, via the process groups

    ap = argparse.ArgumentParser(prog="megatron-r1 eval", description=__doc__)
    ap.add_argument("--load", required=True, help="checkpoint directory (with `latest`)")
    ap.add_argument("--dataset", default=None, help="source (path or builtin:<task>); default: the config's data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--num-problems", type=int, default=None)
    ap.add_argument("--config", default=None, help="YAML config (default: the checkpoint's saved config.yaml)")
    ap.add_argument("--temperature", type=float, default=0.6, help="R1 evaluates at 0.6 with top-p 0.95")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default=None, help="write the JSON here as well as to stdout")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    ckpt = latest_checkpoint(args.load)
    if ckpt is None:
        raise CheckpointError(f"{args.load}: no checkpoint found (no `latest` file)")
    config_path = args.config or (Path(ckpt) / "config.yaml")
    # The weights come from --load, so does the tokenizer unless the config or an override names one.
    cfg = load_config(config_path, ["checkpoint.save=null", f"checkpoint.load={args.load}", *args.overrides])
    stage = start_stage(cfg)
    tokenizer = stage.tokenizer
    model = build_model(cfg.model, cfg.parallel, cfg.training.precision)
    load_model_only(model, args.load)
    model.eval()
    source = args.dataset or cfg.data.eval_source or cfg.data.source
    options = dict(cfg.data.options) if source == (cfg.data.eval_source or cfg.data.source) else {}
    if args.num_problems is not None and source.startswith("builtin:"):
        options["num_samples"] = args.num_problems  # generate only what is used; files are cut below
    samples = load_dataset(source, field_map=cfg.data.field_map or None, split=args.split, **options)
    if args.num_problems is not None:
        samples = samples[: args.num_problems]
    gen = cfg.generation
    gen.temperature, gen.top_p = args.temperature, args.top_p
    max_new = args.max_new_tokens or cfg.rl.max_response_length
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=gen.max_batch_size,
                    max_seq_len=cfg.rl.max_prompt_length + max_new + 1)
    result = evaluate(engine, tokenizer, stage.template, samples, args.k, gen, max_new, args.seed)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0
