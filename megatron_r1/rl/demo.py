"""`megatron-r1 demo`: the whole R1-Zero idea on a laptop CPU in minutes, with real Megatron-Core parts.

(a) pre-train a tiny DeepSeek-V3-shaped model (MLA, DeepSeekMoE with shared expert and bias-balanced sigmoid
router) from scratch on generated text of a demo task, so the base model is weak but not hopeless;
(b) R1-Zero GRPO with the `r1_zero` template and rule rewards only (accuracy + format);
(c) evaluate the held-out split before and after RL: pass@1 over k samples and cons@k.
Everything lands in one run directory: checkpoints, tensorboard events, PNG curves, `results.json`.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import time
from pathlib import Path

from megatron_r1.config import config_from_dict, to_dict
from megatron_r1.data import load_dataset, pretrain_corpus
from megatron_r1.data.templates import get_template
from megatron_r1.data.tokenizer import load_tokenizer
from megatron_r1.logging import get_logger
from megatron_r1.logging.metrics import read_metrics
from megatron_r1.logging.plots import plot_run
from megatron_r1.models import build_model
from megatron_r1.parallel import init_parallel
from megatron_r1.rl.demo_base import (
    LOSS_CURVE,
    SHIPPED,
    describe,
    load_base,
    read_provenance,
    write_base,
    write_provenance,
)
from megatron_r1.rl.evaluate import score_samples
from megatron_r1.rl.rollout import reflection_rate, sample_group_rollouts
from megatron_r1.rl.trainer import run_grpo
from megatron_r1.training.pretrain import run_pretrain

log = get_logger()

TASK = "demo_chain"

# The model and everything both stages share. Tokenizer and vocab: the small built-in demo tokenizer.
COMMON = {
    # deepseek_v3_tiny's structure (MLA, a dense first layer, then DeepSeekMoE with a shared expert and the
    # bias-balanced sigmoid router), narrowed to ~1M parameters: ~5x less compute per token than the preset's
    # 6M, which is what lets GRPO and both evaluations run in minutes on two cores, and ships as a 2 MB file.
    # 224 tokens hold two ~110-token demo documents per pre-training window.
    "model": {"preset": "deepseek_v3_tiny", "num_layers": 3, "hidden_size": 128, "ffn_hidden_size": 384,
              "q_lora_rank": 64, "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16,
              "moe_ffn_hidden_size": 192, "moe_shared_expert_intermediate_size": 192,
              "seq_length": 224, "max_position_embeddings": 256},
    "tokenizer": {"path": "builtin:demo"},
    "data": {"template": "r1_zero"},
    "logging": {"progress": True, "plots": True},
}

PRETRAIN = {
    "stage": "pretrain",
    # The base corpus (data/pretrain.py, demo_chain): every reasoning opens with a quick guess, right 35% of the
    # time (else off by +-10); in 25% of the documents the writer goes on with "wait:" and the worked steps, right.
    # The base therefore has a short mode (measured held-out accuracy 0.25) and a long one (0.82): RL with
    # accuracy + format rewards only can raise accuracy by making answers longer. 90% of the documents are bare
    # "User: ... Assistant: <think> ..." lines (fewer tokens than the full template), so more problems per step.
    "data": {"source": f"builtin:{TASK}",
             "options": {"num_samples": 30000, "seed": 7, "correct_fraction": 0.35, "reflect_fraction": 0.25,
                         "plain_fraction": 0.9, "error_offsets": [-10, 10]}},
    "training": {"train_steps": 1000, "micro_batch_size": 16, "global_batch_size": 16, "seed": 11},
    "optimizer": {"lr": 2e-3, "min_lr": 3e-4, "lr_warmup_steps": 30, "lr_decay_style": "cosine", "clip_grad": 1.0},
}

GRPO = {
    "stage": "grpo",
    "data": {"source": f"builtin:{TASK}", "options": {"num_samples": 4000, "seed": 7}},
    "training": {"train_steps": 40, "micro_batch_size": 32, "global_batch_size": 128, "seed": 13},
    # A small constant lr: Adam's first steps move every weight by ~lr whatever its gradient. From the shipped base,
    # 40 steps at 1e-4 took training accuracy 0.41 -> ~0.7-0.8 and the reflection rate 0.30 -> ~0.93.
    "optimizer": {"lr": 1e-4, "min_lr": 1e-4, "lr_warmup_steps": 0, "lr_decay_style": "constant", "clip_grad": 1.0},
    # shared_prefix: each prompt is computed once per group in the update and the log-prob passes.
    "rl": {"prompts_per_step": 16, "group_size": 8, "max_prompt_length": 128, "max_response_length": 56,
           "mini_batch_size": 128, "shared_prefix": True, "kl_coef": 0.001, "kl_estimator": "k3",
           "clip_low": 0.2, "clip_high": 0.2},
    "generation": {"temperature": 1.0, "max_batch_size": 128},
    "rewards": [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}],
}

QUICK = {  # CI-sized: every stage runs, nothing is expected to learn
    "pretrain": ["training.train_steps=4", "training.global_batch_size=8", "training.micro_batch_size=8",
                 "data.options.num_samples=200"],
    "grpo": ["training.train_steps=2", "rl.prompts_per_step=4", "rl.group_size=4", "rl.mini_batch_size=16",
             "rl.max_response_length=16", "data.options.num_samples=100"],
}


def _merge(*dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = _merge(out[k], v)
            else:
                out[k] = v
    return out


def stage_configs(run_dir: Path, overrides: list[str], quick: bool):
    """The two stage configs of the demo (pretrain, grpo); `stage.key=value` overrides target one stage.

    GRPO starts from (and keeps as its KL reference) `run_dir/base_checkpoint`, the base model the demo writes
    there from the shipped asset or from its own pre-training."""
    shared = [o for o in overrides if not o.startswith(("pretrain.", "grpo."))]
    per = {s: [o.split(".", 1)[1] for o in overrides if o.startswith(f"{s}.")] for s in ("pretrain", "grpo")}
    pre = _merge(COMMON, PRETRAIN, {"logging": {"run_dir": str(run_dir / "pretrain")},
                                    "checkpoint": {"save": str(run_dir / "pretrain" / "checkpoints")}})
    rl = _merge(COMMON, GRPO, {"logging": {"run_dir": str(run_dir / "grpo")},
                               "checkpoint": {"save": str(run_dir / "grpo" / "checkpoints"),
                                              "load": str(run_dir / "base_checkpoint"),
                                              "load_optimizer": False, "finetune": True}})
    q = QUICK if quick else {"pretrain": [], "grpo": []}
    pre_cfg = config_from_dict(pre, q["pretrain"] + shared + per["pretrain"], source="demo pretrain config")
    rl_cfg = config_from_dict(rl, q["grpo"] + shared + per["grpo"], source="demo grpo config")
    return pre_cfg, rl_cfg


def build_demo_model(cfg):
    """The demo's model for `cfg`, on a (re)initialised single-process layout."""
    init_parallel(cfg.parallel, cfg.training.seed)
    return build_model(cfg.model, cfg.parallel, cfg.training.precision)


def held_out_problems(cfg, num_problems: int) -> list[dict]:
    options = dict(cfg.data.options)
    options.update(num_samples=num_problems, unique=True)  # distinct held-out problems
    return load_dataset(cfg.data.source, split="test", **options)[:num_problems]


def evaluate_model(model, cfg, k: int, num_problems: int, seed: int, batch_problems: int = 32) -> dict:
    """pass@1 over k samples, cons@k, format rate, mean length and reflection rate on the held-out split, plus the
    first problem's first answer (`sample`). Sampled at the training temperature (1.0): pass@1 is then the
    expected accuracy of one sampled answer."""
    from megatron_r1.inference import Engine

    model.eval()
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    template = get_template(cfg.data.template)
    samples = held_out_problems(cfg, num_problems)
    max_new = cfg.rl.max_response_length
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=cfg.generation.max_batch_size,
                    max_seq_len=cfg.rl.max_prompt_length + max_new + 1)
    texts, rows, lengths = [], [], []
    for start in range(0, len(samples), batch_problems):  # the chunking of rl.evaluate.evaluate, same seeds
        batch = sample_group_rollouts(engine, tokenizer, template, samples[start:start + batch_problems], k,
                                      cfg.generation, max_new, seed + start, temperature=cfg.generation.temperature)
        texts += batch.texts
        rows += batch.samples
        lengths += [len(r) for r in batch.response_tokens]
    result = score_samples(texts, rows, lengths, k)
    result["reflection_rate"] = reflection_rate(texts, cfg.rl.reflection_words)
    result["sample"] = {"prompt": samples[0]["prompt"], "answer": samples[0]["answer"], "response": texts[0]}
    return result


def evaluate_checkpoint(cfg, ckpt_dir: str, k: int, num_problems: int, seed: int) -> dict:
    """`evaluate_model` for the checkpoint in `ckpt_dir`."""
    from megatron_r1.checkpoint import load_model_only

    model = build_demo_model(cfg)
    load_model_only(model, ckpt_dir)
    return evaluate_model(model, cfg, k, num_problems, seed)


CHECK = {"documents": 64, "problems": 16, "k": 4, "seed": 0}  # the shipped base's recorded check figures


def held_out_loss(model, pre_cfg, num_documents: int) -> float:
    """Mean next-token loss of `model` on held-out documents written like its pre-training corpus (test-split
    problems): deterministic, so a loaded base can be checked against its recorded figure."""
    import torch

    tokenizer = load_tokenizer(pre_cfg.tokenizer.path)
    options = dict(pre_cfg.data.options, num_samples=num_documents, split="test")
    docs = [tokenizer.encode(d) + [tokenizer.eos_id]
            for d in pretrain_corpus(pre_cfg.data.source.split(":", 1)[1], **options)]
    width = max(len(d) for d in docs)
    tokens = torch.full((len(docs), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), width - 1)
    for i, d in enumerate(docs):
        tokens[i, :len(d)] = torch.tensor(d)
        mask[i, :len(d) - 1] = 1.0
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(inputs.shape[1]).expand_as(inputs)
    model.eval()
    with torch.no_grad():
        losses = model(inputs, positions, None, labels=labels)
    return float((losses.float() * mask).sum() / mask.sum())


def vocab_digest(cfg) -> str:
    """sha256 of the tokenizer's vocabulary: the base is only meaningful with the ids it was trained on."""
    tok = load_tokenizer(cfg.tokenizer.path)
    return hashlib.sha256(json.dumps([tok.decode([i]) for i in range(tok.vocab_size)]).encode()).hexdigest()


def check_figures(model, pre_cfg, rl_cfg) -> dict:
    """The small, quick figures a test recomputes from the shipped base: held-out loss and a 16x4 sampled eval."""
    ev = evaluate_model(model, rl_cfg, CHECK["k"], CHECK["problems"], CHECK["seed"])
    return {"held_out_loss": round(held_out_loss(model, pre_cfg, CHECK["documents"]), 5),
            "pass@1": ev["pass@1"], "mean_length": ev["mean_length"], **CHECK}


def pretrain_base(pre_cfg, run_dir: Path, command: str) -> Path:
    """Pre-train the base from scratch and write it as a shippable base directory (`run_dir/base`)."""
    t0 = time.time()
    run_pretrain(pre_cfg)
    return export_base(pre_cfg, run_dir / "base", command, (time.time() - t0) / 60)


def export_base(pre_cfg, base_dir: Path, command: str, minutes: float, made_on: str | None = None) -> Path:
    """Write the pre-training run of `pre_cfg` (its last checkpoint and metrics) as a base directory: fp16 weights,
    provenance (command, config, versions, loss curve) and the loss-curve PNG."""
    import megatron.core
    import torch

    from megatron_r1.checkpoint import load_model_only

    model = build_demo_model(pre_cfg)
    load_model_only(model, pre_cfg.checkpoint.save)
    rows = [r for r in read_metrics(pre_cfg.logging.run_dir) if "loss" in r]
    every = max(1, len(rows) // 100)
    curve = [[r["step"], round(r["loss"], 4)] for r in rows[::every]]
    if rows and curve[-1][0] != rows[-1]["step"]:
        curve.append([rows[-1]["step"], round(rows[-1]["loss"], 4)])
    cfg = to_dict(pre_cfg)
    provenance = {
        "command": command, "minutes": round(minutes, 1),
        "made_on": made_on or (f"{platform.machine()}, {os.cpu_count()} CPUs, load average "
                               f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"torch": torch.__version__, "megatron-core": megatron.core.__version__},
        "model": cfg["model"], "training": cfg["training"], "optimizer": cfg["optimizer"], "data": cfg["data"],
        "tokenizer": cfg["tokenizer"], "tokenizer_vocab_sha256": vocab_digest(pre_cfg), "loss_curve": curve,
    }
    write_base(model, base_dir, provenance)
    curve_png = plot_run(pre_cfg.logging.run_dir, base_dir, groups={"loss_curve": ("loss",)})
    if curve_png and curve_png[0].name != LOSS_CURVE:
        curve_png[0].rename(base_dir / LOSS_CURVE)
    return base_dir


def base_checkpoint(rl_cfg, base_dir: Path):
    """Load the base directory's weights into the demo model and save them as GRPO's starting checkpoint."""
    from megatron_r1.checkpoint import save_model_only

    model = build_demo_model(rl_cfg)
    provenance = load_base(model, base_dir)
    save_model_only(model, rl_cfg.checkpoint.load)
    return model, provenance


def format_table(before: dict, after: dict, k: int) -> str:
    rows = [("pass@1", "pass@1"), (f"cons@{k}", f"cons@{k}"), ("format rate", "format"),
            ("mean length (tokens)", "mean_length"), ("reflection rate", "reflection_rate")]
    lines = [f"{'metric':<22}{'before RL':>12}{'after RL':>12}{'change':>10}", "-" * 56]
    for label, key in rows:
        b, a = before[key], after[key]
        lines.append(f"{label:<22}{b:>12.3f}{a:>12.3f}{a - b:>+10.3f}")
    return "\n".join(lines)


METRICS = ("pass@1", "cons@{k}", "format", "mean_length", "reflection_rate")
# The aha-moment curve, beside plot_run's default ones (reward, accuracy, response length, loss, ...).
RL_CURVES = {"reflection_rate": ("reflection_rate",)}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="megatron-r1 demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    ap.add_argument("--k", type=int, default=8, help="samples per problem for pass@1 / cons@k")
    ap.add_argument("--eval-problems", type=int, default=64, help="held-out problems evaluated")
    ap.add_argument("--pretrain", action="store_true",
                    help="pre-train the base from scratch (what made the shipped one) instead of loading it; "
                         "the new base, with its provenance, is written to RUN_DIR/base")
    ap.add_argument("--base", default=None, help=f"a base directory to start from (default: the shipped {SHIPPED})")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: every stage, a few steps each")
    ap.add_argument("overrides", nargs="*", help="key=value for both stages, or pretrain.key=value / grpo.key=value")
    args = ap.parse_args(argv)
    t0 = time.time()
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pre_cfg, rl_cfg = stage_configs(run_dir, args.overrides, args.quick)
    k = args.k
    problems = 8 if args.quick else args.eval_problems

    if args.pretrain:
        print(f"[1/4] pre-training the tiny DeepSeek-V3 base model from scratch -> {run_dir / 'pretrain'}",
              flush=True)
        command = " ".join(["megatron-r1 demo --pretrain"] + (["--quick"] if args.quick else []) + args.overrides)
        base_dir = pretrain_base(pre_cfg, run_dir, command)
    else:
        base_dir = Path(args.base).resolve() if args.base else SHIPPED
        print(f"[1/4] base model: {base_dir} (rebuild it with --pretrain)", flush=True)
    model, provenance = base_checkpoint(rl_cfg, base_dir)
    print(describe(provenance), flush=True)
    (run_dir / "plots" / "pretrain").mkdir(parents=True, exist_ok=True)
    if (base_dir / LOSS_CURVE).is_file():
        shutil.copy2(base_dir / LOSS_CURVE, run_dir / "plots" / "pretrain" / LOSS_CURVE)
    print("      evaluating the base model on the held-out split", flush=True)
    before = evaluate_model(model, rl_cfg, k, problems, seed=101)
    if args.pretrain:  # a new base records what it scores, and the figures a test recomputes
        provenance = read_provenance(base_dir)
        provenance["held_out"] = {"k": k, "problems": before["num_problems"], "seed": 101,
                                  **{m.format(k=k): before[m.format(k=k)] for m in METRICS}}
        provenance["check"] = check_figures(model, pre_cfg, rl_cfg)
        write_provenance(base_dir, provenance)
    del model
    t_rl = time.time()
    print(f"[2/4] R1-Zero GRPO (accuracy + format rewards only) -> {run_dir / 'grpo'}", flush=True)
    run_grpo(rl_cfg)
    print("[3/4] evaluating the RL model on the held-out split", flush=True)
    after = evaluate_checkpoint(rl_cfg, rl_cfg.checkpoint.save, k, problems, seed=101)
    minutes = (time.time() - t0) / 60
    keys = [m.format(k=k) for m in METRICS]
    results = {"before": {key: before[key] for key in keys}, "after": {key: after[key] for key in keys},
               "samples": {"before": before["sample"], "after": after["sample"]},
               "minutes": round(minutes, 2), "rl_and_eval_minutes": round((time.time() - t_rl) / 60, 2),
               "k": k, "eval_problems": before["num_problems"], "base": str(base_dir)}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print("[4/4] curves", flush=True)
    plots = (plot_run(run_dir / "grpo", run_dir / "plots", groups=RL_CURVES)
             + plot_run(run_dir / "grpo", run_dir / "plots"))
    plots = sorted(set(plots)) + sorted((run_dir / "plots" / "pretrain").glob("*.png"))
    print()
    print(format_table(before, after, k))
    s = before["sample"]
    print(f"\none sampled answer to the held-out problem {s['prompt']} (= {s['answer']}):")
    print(f"  before RL: {s['response'].strip()}")
    print(f"  after RL:  {after['sample']['response'].strip()}")
    print(f"\nfinished in {minutes:.1f} min; run directory: {run_dir}")
    print(f"  results: {run_dir / 'results.json'}")
    print(f"  curves:  {', '.join(str(p.relative_to(run_dir / 'plots')) for p in plots)} in {run_dir / 'plots'}")
    print(f"  tensorboard --logdir {run_dir}")
    return 0
