"""`megatron-r1 demo`: the whole R1-Zero idea on a laptop CPU in minutes, with real Megatron-Core parts.

(a) pre-train a tiny DeepSeek-V3-shaped model (MLA, DeepSeekMoE with shared expert and bias-balanced sigmoid
router) from scratch on generated text of a demo task, so the base model is weak but not hopeless;
(b) R1-Zero GRPO with the `r1_zero` template and rule rewards only (accuracy + format);
(c) evaluate the held-out split before and after RL: pass@1 over k samples and cons@k.
Everything lands in one run directory: checkpoints, tensorboard events, PNG curves, `results.json`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from megatron_r1.config import config_from_dict
from megatron_r1.logging import get_logger

log = get_logger()

TASK = "demo_arithmetic"

# The model and everything both stages share. Tokenizer and vocab: the small built-in demo tokenizer.
COMMON = {
    # 224 tokens hold two ~105-token demo documents per pre-training window.
    "model": {"preset": "deepseek_v3_tiny", "seq_length": 224, "max_position_embeddings": 256},
    "tokenizer": {"path": "builtin:demo"},
    "data": {"template": "r1_zero"},
    "logging": {"progress": True, "plots": True},
}

PRETRAIN = {
    "stage": "pretrain",
    # The base corpus: 45% of the worked solutions are right; the others slip in the last step's tens digit
    # (43+5 = 58 or 38), a systematic habit the base model copies and RL can train away. 90% of the documents
    # are bare "User: 43+5. Assistant: <think> ..." lines (4x fewer tokens than the full template), so the tiny
    # model sees ~100 problems per step. It learns to copy the operands and add their units digits in a phase
    # change whose timing varies from run to run (measured: step ~450 to ~550); on the held-out split, greedy
    # accuracy reached 0.98 by step 700 while sampled (T=1) pass@1 stayed ~0.4 (the slips it copies).
    "data": {"source": f"builtin:{TASK}",
             "options": {"num_samples": 20000, "seed": 7, "correct_fraction": 0.45, "difficulty": 0,
                         "plain_fraction": 0.9, "error_offsets": [-10, 10]}},
    "training": {"train_steps": 800, "micro_batch_size": 16, "global_batch_size": 16, "seed": 11},
    "optimizer": {"lr": 2e-3, "min_lr": 3e-4, "lr_warmup_steps": 30, "lr_decay_style": "cosine", "clip_grad": 1.0},
}

GRPO = {
    "stage": "grpo",
    "data": {"source": f"builtin:{TASK}", "options": {"num_samples": 4000, "seed": 7, "difficulty": 0}},
    "training": {"train_steps": 60, "micro_batch_size": 32, "global_batch_size": 128, "seed": 13},
    # A small constant lr: Adam's first steps move every weight by ~lr whatever its gradient. Measured from this
    # base: at 1e-4 the KL to it is 0.09 after one step and accuracy falls 0.30 -> 0.13 in four; at 3e-4, KL 0.5.
    "optimizer": {"lr": 5e-5, "min_lr": 5e-5, "lr_warmup_steps": 0, "lr_decay_style": "constant", "clip_grad": 1.0},
    # shared_prefix: each prompt is computed once per group in the update and the log-prob passes.
    "rl": {"prompts_per_step": 16, "group_size": 8, "max_prompt_length": 128, "max_response_length": 32,
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
    """The two stage configs of the demo (pretrain, grpo); `stage.key=value` overrides target one stage."""
    shared = [o for o in overrides if not o.startswith(("pretrain.", "grpo."))]
    per = {s: [o.split(".", 1)[1] for o in overrides if o.startswith(f"{s}.")] for s in ("pretrain", "grpo")}
    pre = _merge(COMMON, PRETRAIN, {"logging": {"run_dir": str(run_dir / "pretrain")},
                                    "checkpoint": {"save": str(run_dir / "pretrain" / "checkpoints")}})
    rl = _merge(COMMON, GRPO, {"logging": {"run_dir": str(run_dir / "grpo")},
                               "checkpoint": {"save": str(run_dir / "grpo" / "checkpoints"),
                                              "load": str(run_dir / "pretrain" / "checkpoints"),
                                              "load_optimizer": False, "finetune": True}})
    q = QUICK if quick else {"pretrain": [], "grpo": []}
    pre_cfg = config_from_dict(pre, q["pretrain"] + shared + per["pretrain"], source="demo pretrain config")
    rl_cfg = config_from_dict(rl, q["grpo"] + shared + per["grpo"], source="demo grpo config")
    return pre_cfg, rl_cfg


def evaluate_checkpoint(cfg, ckpt_dir: str, k: int, num_problems: int, seed: int) -> dict:
    """pass@1 over k samples and cons@k on the held-out split, for the checkpoint in `ckpt_dir`."""
    from megatron_r1.checkpoint import load_model_only
    from megatron_r1.data import load_dataset
    from megatron_r1.data.templates import get_template
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.inference import Engine
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel
    from megatron_r1.rl.evaluate import evaluate

    init_parallel(cfg.parallel, cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel, cfg.training.precision)
    load_model_only(model, ckpt_dir)
    model.eval()
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    options = dict(cfg.data.options)
    options.update(num_samples=num_problems, unique=True)  # distinct held-out problems
    samples = load_dataset(cfg.data.source, split="test", **options)[:num_problems]
    max_new = cfg.rl.max_response_length
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=cfg.generation.max_batch_size,
                    max_seq_len=cfg.rl.max_prompt_length + max_new + 1)
    # Sampled at the training temperature (1.0): pass@1 is then the expected accuracy of one sampled answer.
    return evaluate(engine, tokenizer, get_template(cfg.data.template), samples, k, cfg.generation, max_new,
                    seed=seed, temperature=cfg.generation.temperature)


def format_table(before: dict, after: dict, k: int) -> str:
    rows = [("pass@1", "pass@1"), (f"cons@{k}", f"cons@{k}"), ("format rate", "format"),
            ("mean length (tokens)", "mean_length")]
    lines = [f"{'metric':<22}{'before RL':>12}{'after RL':>12}{'change':>10}", "-" * 56]
    for label, key in rows:
        b, a = before[key], after[key]
        lines.append(f"{label:<22}{b:>12.3f}{a:>12.3f}{a - b:>+10.3f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from megatron_r1.logging.plots import plot_run
    from megatron_r1.rl.trainer import run_grpo
    from megatron_r1.training.pretrain import run_pretrain

    ap = argparse.ArgumentParser(prog="megatron-r1 demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/demo", help="where everything is written (default runs/demo)")
    ap.add_argument("--k", type=int, default=8, help="samples per problem for pass@1 / cons@k")
    ap.add_argument("--eval-problems", type=int, default=64, help="held-out problems evaluated")
    ap.add_argument("--quick", action="store_true", help="CI-sized run: every stage, a few steps each")
    ap.add_argument("overrides", nargs="*", help="key=value for both stages, or pretrain.key=value / grpo.key=value")
    args = ap.parse_args(argv)
    t0 = time.time()
    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    pre_cfg, rl_cfg = stage_configs(run_dir, args.overrides, args.quick)
    k = args.k
    problems = 8 if args.quick else args.eval_problems

    print(f"[1/4] pre-training the tiny DeepSeek-V3 base model -> {run_dir / 'pretrain'}", flush=True)
    run_pretrain(pre_cfg)
    print("[2/4] evaluating the base model on the held-out split", flush=True)
    before = evaluate_checkpoint(rl_cfg, pre_cfg.checkpoint.save, k, problems, seed=101)
    print(f"[3/4] R1-Zero GRPO (accuracy + format rewards) -> {run_dir / 'grpo'}", flush=True)
    run_grpo(rl_cfg)
    print("[4/4] evaluating the RL model on the held-out split", flush=True)
    after = evaluate_checkpoint(rl_cfg, rl_cfg.checkpoint.save, k, problems, seed=101)
    minutes = (time.time() - t0) / 60
    results = {"before": {key: before[key] for key in ("pass@1", f"cons@{k}", "format", "mean_length")},
               "after": {key: after[key] for key in ("pass@1", f"cons@{k}", "format", "mean_length")},
               "minutes": round(minutes, 2), "k": k, "eval_problems": before["num_problems"]}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plots = plot_run(run_dir / "grpo", run_dir / "plots") + plot_run(run_dir / "pretrain", run_dir / "plots" / "pretrain")
    print()
    print(format_table(before, after, k))
    print(f"\nfinished in {minutes:.1f} min; run directory: {run_dir}")
    print(f"  results: {run_dir / 'results.json'}")
    print(f"  curves:  {', '.join(str(p.relative_to(run_dir / 'plots')) for p in plots)} in {run_dir / 'plots'}")
    print(f"  tensorboard --logdir {run_dir}")
    return 0
