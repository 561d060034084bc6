"""The prepared GPU check: everything the project claims about a GPU, measured in one run of at most ~8 minutes.

On one H100/H200 with torch and megatron-core (Transformer Engine and flash-attn are used when they import, never
assumed), it runs five sections, each timed and reported even when another fails:

  logprobs  engine vs trainer log-prob max / mean |difference| in bf16, on a DeepSeek-V3-shaped model (~1B
            parameters: MLA + DeepSeekMoE, sigmoid group-limited router, first layer dense) and a Qwen2-0.5B-shaped
            one (24 layers, hidden 896, GQA 14/2, QKV bias, tied embeddings), random weights. The engine samples
            answers (its own forward, `megatron_r1.inference.functional`, reading the weights through
            layer_adapter); the trainer recomputes them (`rl.policy_forward.compute_logprobs`: Megatron's forward,
            `megatron_r1.ops` log-probs), the same code GRPO's importance ratios compare.
  decode    decode tokens/s at batch 1 / 64 / 256, eager and with CUDA graphs (`generation.cuda_graphs`), and
            the % of the HBM-bandwidth roofline: (weight bytes + the batch's KV-cache bytes) per step divided by
            a measured device-to-device copy bandwidth. Decode time = time(N new tokens) - time(1 new token),
            so prefill is not counted.
  ops       the GRPO ops (`megatron_r1.ops`: CUDA csrc/, Triton, chunked torch) against the naive reference
            (loss and both gradients) and their forward+backward time against the matmul floor (the three GEMMs
            no method avoids) and against Liger's fused linear GRPO loss where liger-kernel imports.
  grpo      one GRPO step (generation + rewards + log-probs + update + refit) through `run_grpo` on the
            DeepSeek-V3-shaped model (builtin:demo_arithmetic, accuracy + format rewards), with the step's time
            split and tokens/s per GPU: (prompt + response tokens of every answer) / step time, one GPU. Two steps
            are logged; the second is the one to quote (the first captures graphs and builds kernels).
  tests     the `gpu`-marked tests (tests/ops/test_gpu.py, tests/inference/test_cuda_graphs.py) in a subprocess.

It prints markdown tables (for docs/benchmarks.md) and writes JSON (--json). `--dry-run` runs the same code on the
CPU at tiny shapes (fp32; CUDA graphs replaced by the same bucketed static step without capture, copy bandwidth
of host memory), so CI runs it and it cannot rot: tests/tools/test_gpu_check.py. How the device run is prepared
(carried wheels, the wrapper tools/gpu_check.sh) is in docs/gpu.md.

    python tools/gpu_check.py [--dry-run] [--json PATH] [--markdown PATH] [--sections logprobs,decode,ops,grpo,tests]
                              [--budget-s 480]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SECTIONS = ("logprobs", "decode", "ops", "grpo", "tests")
GPU_TESTS = ("tests/ops/test_gpu.py", "tests/inference/test_cuda_graphs.py")

# Model shapes: preset + overrides. The GPU ones are what the issue names; the dry-run ones keep the structure
# (MLA + MoE with shared expert and group-limited sigmoid router; dense GQA with QKV bias) at CPU-test size.
MODELS = {
    "gpu": {
        "deepseek_v3_1b": ("deepseek_v3_tiny", dict(
            num_layers=12, hidden_size=1280, ffn_hidden_size=3584, num_attention_heads=16, q_lora_rank=384,
            kv_lora_rank=256, qk_head_dim=64, qk_pos_emb_head_dim=32, v_head_dim=64, num_experts=24,
            moe_ffn_hidden_size=512, moe_shared_expert_intermediate_size=512, moe_router_topk=4,
            moe_router_num_groups=4, moe_router_group_topk=2, vocab_size=129280, seq_length=1024,
            max_position_embeddings=4096, original_max_position_embeddings=4096, rotary_scaling_factor=1.0)),
        "qwen2_0.5b": ("qwen2", dict(
            num_layers=24, hidden_size=896, ffn_hidden_size=4864, num_attention_heads=14, num_query_groups=2,
            vocab_size=151936, untie_embeddings_and_output_weights=False, seq_length=1024,
            max_position_embeddings=4096)),
    },
    "dry": {
        "deepseek_v3_1b": ("deepseek_v3_tiny", dict(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=2, q_lora_rank=32,
            kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, moe_ffn_hidden_size=64,
            moe_shared_expert_intermediate_size=64, vocab_size=384, seq_length=128, max_position_embeddings=160)),
        "qwen2_0.5b": ("qwen2_tiny", dict(
            num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
            vocab_size=384, seq_length=128, max_position_embeddings=160)),
    },
}
# Sizes per mode: prompts/answers of the log-prob check, decode batches and lengths, op shapes (T, H, V), GRPO.
SIZES = {
    "gpu": dict(lp_prompts=16, lp_prompt_len=(16, 96), lp_new=64, decode_batches=(1, 64, 256), decode_prompt=128,
                decode_new=64, copy_bytes=2 << 30, op_shapes=((4096, 4096, 129280), (16384, 1024, 151936)),
                op_reps=5, grpo=dict(prompts=8, group=8, max_response=128, mini=64), test_timeout=240),
    "dry": dict(lp_prompts=4, lp_prompt_len=(3, 9), lp_new=6, decode_batches=(1, 4, 8), decode_prompt=8,
                decode_new=5, copy_bytes=32 << 20, op_shapes=((64, 32, 100),), op_reps=2,
                grpo=dict(prompts=2, group=2, max_response=6, mini=4), test_timeout=120),
}


# ----------------------------------------------------------------------------------------------- helpers
def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn):
    _sync()
    t = time.perf_counter()
    out = fn()
    _sync()
    return time.perf_counter() - t, out


def model_config(name: str, mode: str):
    from megatron_r1.models import get_preset

    preset, over = MODELS[mode][name]
    return dataclasses.replace(get_preset(preset), **over)


class Models:
    """Each model built once (random weights, seed 0) and shared by the sections that need it."""

    def __init__(self, mode: str, precision: str):
        self.mode, self.precision, self._built = mode, precision, {}

    def get(self, name: str):
        if name not in self._built:
            import torch

            from megatron_r1.config import ParallelConfig
            from megatron_r1.models import build_model
            from megatron_r1.parallel import init_parallel

            init_parallel(ParallelConfig(), 0)
            torch.manual_seed(0)
            m = model_config(name, self.mode)
            t, model = _timed(lambda: build_model(m, ParallelConfig(), self.precision).eval())
            n = sum(p.numel() for p in model.parameters())
            self._built[name] = (m, model, {"params_M": round(n / 1e6, 1), "build_s": round(t, 1)})
        return self._built[name]


# -------------------------------------------------------------------------------------------- log-probs
def section_logprobs(ctx) -> list[dict]:
    import torch

    from megatron_r1.inference import Engine, SamplingParams
    from megatron_r1.models.builder import resolve_transformer_impl
    from megatron_r1.rl.batch import RolloutBatch, collate
    from megatron_r1.rl.policy_forward import compute_logprobs

    s = ctx.sizes
    rows = []
    for name in MODELS[ctx.mode]:
        m, model, info = ctx.models.get(name)
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(1)
        lo, hi = s["lp_prompt_len"]
        prompts = [torch.randint(0, m.vocab_size, (int(torch.randint(lo, hi + 1, (1,), generator=g)),),
                                 generator=g).tolist() for _ in range(s["lp_prompts"])]
        temp = 1.0
        engine = Engine(model, max_batch_size=len(prompts), max_seq_len=hi + s["lp_new"] + 1,
                        vocab_size=m.vocab_size)
        res = engine.generate(prompts, SamplingParams(temperature=temp, max_tokens=s["lp_new"], seed=3,
                                                      ignore_eos=True))
        n = len(res)
        rb = RolloutBatch(prompt_tokens=prompts, response_tokens=[r.token_ids for r in res],
                          behavior_logprobs=[r.logprobs for r in res], texts=[""] * n, samples=[{}] * n,
                          finish_reasons=[r.finish_reason for r in res], group_size=1,
                          advantages=torch.zeros(n))
        pb = collate(rb, pad_id=0)
        trainer = compute_logprobs([model], pb, n, temp, device)
        mask = pb.response_mask.bool()
        behaviour = torch.zeros_like(trainer)
        for i, r in enumerate(res):
            behaviour[i, :len(r.logprobs)] = torch.tensor(r.logprobs)
        diff = (trainer - behaviour).abs()[mask]
        rows.append({"model": name, **info, "impl": resolve_transformer_impl(m),
                     "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                     "tokens": int(mask.sum()), "max_abs_diff": float(diff.max()),
                     "mean_abs_diff": float(diff.mean()), "finite": bool(torch.isfinite(trainer[mask]).all())})
        del engine
    bad = [r["model"] for r in rows if not r["finite"] or r["max_abs_diff"] > ctx.args.logprob_tol]
    if bad:
        raise CheckFailed(f"engine vs trainer log-probs differ by more than {ctx.args.logprob_tol} (or are not "
                          f"finite) for {', '.join(bad)}", rows)
    return rows


# ----------------------------------------------------------------------------------------------- decode
def copy_bandwidth(nbytes: int, reps: int = 5) -> float:
    """Bytes/s of a device-to-device copy (read + write counted): the bandwidth decode can hope for."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = min(_timed(lambda: y.copy_(x))[0] for _ in range(reps))
    return 2 * nbytes / best


def _decode_seconds(engine, prompts, new: int, sampling_params) -> float:
    """Seconds of new - 1 decode steps: the best time of `new` greedy tokens minus the best of one token (the
    prefill and the first token), after a warm-up run (allocations, kernel builds, one graph capture per bucket)."""

    def gen(k):
        out = engine.generate(prompts, sampling_params(temperature=0.0, max_tokens=k, ignore_eos=True))
        assert all(len(r.token_ids) == k for r in out)

    gen(new)
    t_full = min(_timed(lambda: gen(new))[0] for _ in range(2))
    t_one = min(_timed(lambda: gen(1))[0] for _ in range(2))
    return max(t_full - t_one, 1e-9)


def section_decode(ctx) -> list[dict]:
    import torch

    from megatron_r1.inference import Engine, SamplingParams

    s = ctx.sizes
    bw = copy_bandwidth(s["copy_bytes"])
    ctx.meta["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    on_gpu = torch.cuda.is_available()
    rows = []
    p_len, new = s["decode_prompt"], s["decode_new"]
    for name in MODELS[ctx.mode]:
        m, model, info = ctx.models.get(name)
        w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        g = torch.Generator().manual_seed(2)
        for b in s["decode_batches"]:
            prompts = torch.randint(0, m.vocab_size, (b, p_len), generator=g).tolist()
            for mode in ("eager", "graphs"):
                # off the GPU "graphs" is the same bucketed static step, run without capture
                engine = Engine(model, max_batch_size=b, max_seq_len=p_len + new + 1, cuda_graphs=mode == "graphs",
                                static_decode=mode == "graphs")
                decode_s = _decode_seconds(engine, prompts, new, SamplingParams)
                tok_s = b * (new - 1) / decode_s
                step_bytes = w_bytes + b * (p_len + new / 2) * engine.cache.bytes_per_token()
                roof_tok_s = b * bw / step_bytes
                rows.append({"model": name, "batch": b, "mode": mode if on_gpu or mode == "eager" else "static",
                             "tokens_per_s": round(tok_s, 1), "step_ms": round(1e3 * decode_s / (new - 1), 3),
                             "MB_per_step": round(step_bytes / 1e6, 1),
                             "roofline_pct": round(100 * tok_s / roof_tok_s, 1)})
                del engine
                if on_gpu:
                    torch.cuda.empty_cache()
    return rows


# -------------------------------------------------------------------------------------------------- ops
def _grads_of(name, inputs, backend):
    """Gradients (hidden, weight) of one method on fresh leaves (bench_kernels._method's callables)."""
    import bench_kernels

    hid, w, tok, mask, adv, old = inputs
    os.environ["MEGATRON_R1_OPS"] = backend
    x, y = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    run, _ = bench_kernels._method(name, hid, w, tok, mask, adv, old)
    run(x, y)
    return x.grad.float(), y.grad.float()


def section_ops(ctx) -> list[dict]:
    import importlib.util

    import torch

    import bench_kernels
    from megatron_r1.ops.dispatch import available_backends

    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_avail, backends = _timed(lambda: sorted(available_backends(device) - {"reference"}))
    ctx.meta["ops_backends"] = backends
    ctx.meta["ops_backend_probe_s"] = round(t_avail, 1)  # includes the csrc/ build on a fresh machine
    if device == "cuda":
        from megatron_r1.ops import cuda_ext

        if "cuda" not in backends:
            ctx.meta["cuda_ext_error"] = str(cuda_ext.build_error())
    has_liger = importlib.util.find_spec("liger_kernel") is not None
    rows = []
    saved = os.environ.get("MEGATRON_R1_OPS")
    try:
        for t, h, v in ctx.sizes["op_shapes"]:
            inputs = bench_kernels._setup(t, h, v, device)
            ref = _grads_of("naive", inputs, "reference")
            scale = [r.abs().max().item() or 1.0 for r in ref]
            methods = [("floor", None), ("naive", "reference")]
            methods += [(m, b) for b in backends for m in ("fused", "split")]
            if has_liger:
                methods.append(("liger", None))
            times = {}
            for name, backend in methods:
                if backend is not None:
                    os.environ["MEGATRON_R1_OPS"] = backend
                call = bench_kernels._caller(name, inputs, device)
                call()  # warm-up (Triton JIT, cuBLAS heuristics)
                times[(name, backend)] = statistics.median(_timed(call)[0] for _ in range(ctx.sizes["op_reps"]))
            floor = times[("floor", None)]
            for (name, backend), secs in times.items():
                row = {"shape": f"{t}x{h}x{v}", "method": name, "backend": backend or "-",
                       "ms": round(1e3 * secs, 3), "x_floor": round(secs / floor, 2)}
                if name in ("fused", "split"):
                    got = _grads_of(name, inputs, backend)
                    row["max_rel_err"] = max(float((a - b).abs().max()) / s for a, b, s in zip(got, ref, scale))
                if device == "cuda":
                    row["roofline_pct"] = round(100 * 6 * t * h * v / secs / (ctx.args.peak_tflops * 1e12), 1)
                rows.append(row)
            del inputs
    finally:
        if saved is None:
            os.environ.pop("MEGATRON_R1_OPS", None)
        else:
            os.environ["MEGATRON_R1_OPS"] = saved
    tol = 3e-2 if device == "cuda" else 1e-4  # bf16 inputs on the GPU (as tests/ops/test_gpu.py), fp32 on the CPU
    bad = [f"{r['method']}/{r['backend']}@{r['shape']}" for r in rows if r.get("max_rel_err", 0.0) > tol]
    if bad:
        raise CheckFailed(f"ops gradients differ from the reference by more than {tol}: {', '.join(bad)}", rows)
    return rows


# ------------------------------------------------------------------------------------------------- GRPO
def grpo_config(ctx, work: Path):
    from megatron_r1.config import config_from_dict

    g = ctx.sizes["grpo"]
    preset, over = MODELS[ctx.mode]["deepseek_v3_1b"]
    n = g["prompts"] * g["group"]
    return config_from_dict({
        "stage": "grpo",
        "model": {"preset": preset, **over},
        "tokenizer": {"path": "builtin:demo"},
        "data": {"source": "builtin:demo_arithmetic", "template": "plain", "options": {"num_samples": 256, "seed": 1}},
        "training": {"train_steps": 2, "micro_batch_size": min(n, 16), "global_batch_size": n, "seed": 5,
                     "precision": ctx.precision},
        "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "lr_warmup_steps": 0, "lr_decay_style": "constant"},
        "rl": {"prompts_per_step": g["prompts"], "group_size": g["group"], "max_prompt_length": 32,
               "max_response_length": g["max_response"], "mini_batch_size": g["mini"], "kl_coef": 0.001},
        "generation": {"temperature": 1.0, "max_batch_size": n},
        "rewards": [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.5}],
        "logging": {"run_dir": str(work / "run"), "progress": False, "plots": False, "tensorboard": False},
    }, [], source="gpu_check")


def section_grpo(ctx) -> list[dict]:
    from megatron_r1.logging.metrics import read_metrics
    from megatron_r1.rl.trainer import run_grpo

    with tempfile.TemporaryDirectory(prefix="gpu_check_grpo_") as work:
        cfg = grpo_config(ctx, Path(work))
        run_grpo(cfg)
        rows = sorted(read_metrics(Path(work) / "run"), key=lambda r: r["step"])
    out = []
    for r in rows:
        split = {k[5:-2]: round(v, 3) for k, v in r.items() if k.startswith("time/") and k != "time/step_s"}
        n = cfg.rl.prompts_per_step * cfg.rl.group_size
        gen = r["response_length/mean"] * n
        # prompt + response tokens of the step's answers (each answer's own sequence), as the trainer counts them
        seq = r["train_tokens_per_s"] * r["time/update_s"] / cfg.rl.ppo_epochs
        out.append({"step": int(r["step"]), "step_s": round(r["time/step_s"], 3), **{f"{k}_s": v for k, v in
                    split.items()}, "gen_tokens": int(gen), "gen_tokens_per_s": round(r["gen_tokens_per_s"], 1),
                    "train_tokens_per_s": round(r["train_tokens_per_s"], 1),
                    "seq_tokens": int(round(seq)), "tokens_per_s_per_gpu": round(seq / r["time/step_s"], 1)})
    if len(out) < 2:
        raise CheckFailed(f"run_grpo logged {len(out)} steps, expected 2", out)
    return out


# ------------------------------------------------------------------------------------------------ tests
def section_tests(ctx) -> list[dict]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-o", "addopts=",
           *GPU_TESTS]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=ctx.sizes["test_timeout"])
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", "\n".join(tail))}
    row = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, **counts}
    if proc.returncode not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise CheckFailed("gpu-marked tests failed:\n" + "\n".join(tail), [row])
    return [row]


# ---------------------------------------------------------------------------------------------- driver
class CheckFailed(Exception):
    """A section ran but its figures fail its check; `rows` are still reported."""

    def __init__(self, message, rows):
        super().__init__(message)
        self.rows = rows


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    mode: str
    precision: str
    sizes: dict
    models: Models
    meta: dict


def environment() -> dict:
    import torch

    from megatron_r1.parallel import cpu_compat

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else
            platform.processor() or "cpu", "transformer_engine": cpu_compat.te_available()}
    for mod in ("megatron.core", "triton", "flash_attn", "liger_kernel", "transformer_engine"):
        try:
            info[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:  # noqa: BLE001 - any failure of an optional import is reported, not fatal
            info[mod] = f"absent ({type(e).__name__})"
    if not cpu_compat.te_available():
        info["transformer_engine"] = "absent or broken (local spec)"
    return info


def markdown_header(result: dict) -> str:
    where = "dry run on CPU" if result["dry_run"] else result["meta"].get("device")
    return f"## GPU check ({where})\n\n" + ", ".join(f"{k} {v}" for k, v in result["meta"].items()) + "\n"


def markdown_section(name: str, sec: dict) -> str:
    lines = [f"### {name}: {sec['status']} ({sec.get('seconds', 0):.1f} s)"]
    if sec.get("error"):
        lines += ["", "    " + sec["error"].strip().splitlines()[-1]]
    rows = sec.get("rows") or []
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(result: dict) -> str:
    """The whole result as markdown (the header with the environment and the figures found during the run)."""
    return "\n".join([markdown_header(result)] + [markdown_section(n, s) for n, s in result["sections"].items()]
                     + [f"total {result['total_s']:.0f} s"])


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 and x else f"{x:,.2f}".rstrip("0").rstrip(".")
    return str(x)


def run(args) -> dict:
    import torch

    mode = "dry" if args.dry_run else "gpu"
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run to run the same code on the CPU")
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        # Triton's kernels run on the CPU through its interpreter (slow, so only at the dry run's tiny shapes):
        # the ops section then checks them against the reference there too.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    precision = "fp32" if args.dry_run else "bf16"
    ctx = Context(args, mode, precision, SIZES[mode], Models(mode, precision), {})
    start = time.perf_counter()
    result = {"dry_run": args.dry_run, "meta": environment(), "sections": {}}
    print(markdown_header(result), flush=True)
    fns = {"logprobs": section_logprobs, "decode": section_decode, "ops": section_ops, "grpo": section_grpo,
           "tests": section_tests}
    for name in args.sections:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            result["sections"][name] = {"status": f"skipped (budget {args.budget_s:.0f} s spent)", "seconds": 0.0}
            continue
        print(f"[gpu_check] {name} ... ({elapsed:.0f} s so far)", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            rows = fns[name](ctx)
            sec = {"status": "ok", "rows": rows}
        except CheckFailed as e:
            sec = {"status": "FAILED", "rows": e.rows, "error": str(e)}
        except Exception:  # noqa: BLE001 - one broken section must not hide the others' figures in a 15-min lease
            sec = {"status": "ERROR", "error": traceback.format_exc()}
            print(sec["error"], file=sys.stderr, flush=True)
        sec["seconds"] = round(time.perf_counter() - t, 1)
        result["sections"][name] = sec
        print(markdown_section(name, sec), flush=True)  # as it comes: a run cut off still printed its figures
        result["meta"].update(ctx.meta)
        result["total_s"] = round(time.perf_counter() - start, 1)
        _write_json(args.json, result)  # after every section: a run cut off by the lease keeps what it measured
    result["meta"].update(ctx.meta)
    result["total_s"] = round(time.perf_counter() - start, 1)
    return result


def _write_json(path, result) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny shapes (fp32)")
    ap.add_argument("--json", default=None, help="write the results here, after every section")
    ap.add_argument("--markdown", default=None, help="write all the tables here at the end (for docs/benchmarks.md)")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    type=lambda s: [x for x in s.split(",") if x], help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="sections not started by then are skipped (the device lease is 15 min, all tries)")
    ap.add_argument("--logprob-tol", type=float, default=None,
                    help="max |engine - trainer| log-prob allowed (default 0.25 in bf16, 1e-4 in the fp32 dry run)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for the ops' %% of roofline")
    args = ap.parse_args(argv)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)} (choose from {', '.join(SECTIONS)})")
    if args.logprob_tol is None:
        args.logprob_tol = 1e-4 if args.dry_run else 0.25
    result = run(args)
    print(f"total {result['total_s']:.0f} s; " + ", ".join(f"{k} {v}" for k, v in result["meta"].items()
                                                          if k in ("copy_bandwidth_GBps", "ops_backends",
                                                                   "ops_backend_probe_s", "cuda_ext_error")))
    _write_json(args.json, result)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(markdown(result) + "\n")
    ok = all(s["status"] == "ok" for s in result["sections"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
