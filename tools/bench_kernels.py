"""Benchmark GRPO loss forward+backward from hidden states: naive torch, ours, Liger, and the matmul floor.

For each shape (T tokens, H hidden, V vocab) it times forward+backward of
  floor   the three bare matmuls no method avoids: logits = h·Wᵀ, grad_h = g·W, grad_W = gᵀ·h
  naive   full fp32 logits, log_softmax, gather, GRPO loss (reference.grpo_policy_loss), autograd
  fused   megatron_r1.ops.fused_grpo_loss: gradients produced chunk by chunk during forward
  split   megatron_r1.ops.token_logprobs + grpo_policy_loss: the composable path (recomputes logits in backward)
  liger   liger_kernel's LigerFusedLinearGRPOLoss, when installed
and prints time, peak memory, and the ratios to naive and to the floor; on CUDA also % of roofline
(the floor's 6·T·H·V FLOPs at --peak-tflops).

Time: all methods run in one process, interleaved round-robin (one warm-up call each, then --reps rounds);
each method's fastest call is reported (medians too). On CPU the ratios use process CPU time (all threads,
time.process_time) by default, with OMP_WAIT_POLICY=PASSIVE so idle worker threads do not spin: on a shared
machine (this project's has 2 cores and load averages above 10) wall time swings 3x between identical calls while
CPU time stays within 2%. --clock wall uses wall time instead; on CUDA the clock is always wall time (synchronized).

Peak memory: every (method, shape) runs once in its own subprocess. On CPU the number is the process's peak RSS
(getrusage ru_maxrss, which the kernel tracks exactly) minus its RSS once the inputs exist, measured over the
first call; on CUDA it is torch.cuda.max_memory_allocated minus the allocated bytes before the call. Both include
the gradient buffers every method returns.

CPU default: T=4096, H=512, V=32000 only (a few minutes on 2 cores); --full runs the whole grid
T in {4096, 16384} x H in {512, 4096} x V in {32000, 129280}, skipping shapes whose naive run would not fit in
memory. Usage: python tools/bench_kernels.py [--device cpu|cuda] [--json] [--full] [--shape T,H,V ...]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("floor", "naive", "fused", "split", "liger")
FULL_GRID = [(t, h, v) for t in (4096, 16384) for h in (512, 4096) for v in (32000, 129280)]
ANSWER_LEN = 256


def _inputs(t, h, v, device, dtype):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    hid = (torch.randn(t, h, device=device, generator=g) * 0.5).to(dtype)
    w = (torch.randn(v, h, device=device, generator=g) / h**0.5).to(dtype)
    b = max(1, t // ANSWER_LEN)
    tok = torch.randint(0, v, (b, t // b), device=device, generator=g)
    mask = torch.rand(b, t // b, device=device, generator=g) < 0.9
    adv = torch.randn(b, device=device, generator=g)
    return hid.view(b, t // b, h), w, tok, mask, adv


def _method(name, hid, w, tok, mask, adv, old):
    import torch

    from megatron_r1.ops import fused_grpo_loss, grpo_policy_loss, reference, token_logprobs

    b, l, h = hid.shape
    if name == "floor":
        def run(x, y):
            z = x.reshape(b * l, h) @ y.t()
            return [z @ y, z.t() @ x.reshape(b * l, h)]
        return run, False
    if name == "naive":
        def run(x, y):
            logits = x.reshape(b * l, h).float() @ y.float().t()
            lp = torch.log_softmax(logits, -1).gather(1, tok.reshape(-1, 1)).view(b, l)
            loss, _ = reference.grpo_policy_loss(lp, old, adv, mask)
            loss.backward()
        return run, True
    if name == "fused":
        def run(x, y):
            fused_grpo_loss(x, y, tok, old, adv, mask)[0].backward()
        return run, True
    if name == "split":
        def run(x, y):
            lp = token_logprobs(x.reshape(b * l, h), y, tok.reshape(-1)).view(b, l)
            grpo_policy_loss(lp, old, adv, mask)[0].backward()
        return run, True
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        fn = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, compiled=hid.is_cuda, loss_type="grpo")

        def run(x, y):
            out = fn(_input=x, lin_weight=y, selected_token_ids=tok, attention_mask=mask.long(), advantages=adv,
                     old_per_token_logps=old)
            (out[0] if isinstance(out, tuple) else out).backward()
        return run, True
    raise ValueError(name)


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _setup(t, h, v, device):
    import torch

    from megatron_r1.ops import token_logprobs

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hid, w, tok, mask, adv = _inputs(t, h, v, device, dtype)
    with torch.no_grad():
        b, l, _ = hid.shape
        old = token_logprobs(hid.reshape(b * l, h), w, tok.reshape(-1)).view(b, l) + 0.05
    return hid, w, tok, mask, adv, old


def _caller(name, inputs, device):
    import torch

    hid, w, tok, mask, adv, old = inputs
    run, grads = _method(name, hid, w, tok, mask, adv, old)
    x, y = hid.clone().requires_grad_(grads), w.clone().requires_grad_(grads)

    def call():
        x.grad = y.grad = None
        with torch.set_grad_enabled(grads):
            run(x, y)
        if device == "cuda":
            torch.cuda.synchronize()
    return call


def measure_memory(name, t, h, v, device):
    """Peak memory of one forward+backward of `name`, in this fresh process: {"peak_bytes"} or {"error"}."""
    import torch

    inputs = _setup(t, h, v, device)
    try:
        call = _caller(name, inputs, device)
    except ImportError as e:
        return {"error": f"not installed ({e.name})"}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call()
        return {"peak_bytes": torch.cuda.max_memory_allocated() - base}
    base = _rss_bytes()
    call()
    return {"peak_bytes": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base, 0)}


def measure_times(names, t, h, v, device, reps):
    """Interleaved timings of every method: {name: [seconds, ...]} (errors as {"error"})."""
    inputs = _setup(t, h, v, device)
    calls, out = {}, {}
    for name in names:
        try:
            calls[name] = _caller(name, inputs, device)
            calls[name]()  # warm-up
        except ImportError as e:
            out[name] = {"error": f"not installed ({e.name})"}
        except RuntimeError as e:
            out[name] = {"error": str(e).splitlines()[0]}
    times = {n: {"wall": [], "cpu": []} for n in calls}
    for _ in range(reps):
        for n, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times[n]["cpu"].append(time.process_time() - c0)
            times[n]["wall"].append(time.perf_counter() - t0)
    out.update(times)
    return out


def _fits(t, h, v, device):
    """Whether naive torch's [T, V] fp32 buffers (about four of them) fit in free memory."""
    need = 4 * t * v * 4 + 4 * (t + v) * h * 4
    if device == "cuda":
        import torch

        return need < torch.cuda.mem_get_info()[0] * 0.9
    import psutil

    return need < psutil.virtual_memory().available * 0.8


def _subprocess(args, shape, device):
    cmd = [sys.executable, __file__, "--_worker", *args, "--shape", ",".join(map(str, shape)), "--device", device]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # a benchmark of interpreted Triton would be meaningless
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_shape(shape, methods, device, reps, clock):
    """Memory (a process per method) and interleaved times (one process) for one shape."""
    rows = {m: _subprocess(["mem", m], shape, device) for m in methods}
    timed = _subprocess(["time", ",".join(m for m in methods if "error" not in rows[m]), "--reps", str(reps)],
                        shape, device)
    for m in methods:
        if "error" in rows[m]:
            continue
        got = timed.get(m, timed if "error" in timed else {"error": "not timed"})
        if "error" in got:
            rows[m] = got
            continue
        rows[m].update(wall_s=min(got["wall"]), wall_median_s=statistics.median(got["wall"]),
                       cpu_s=min(got["cpu"]), cpu_median_s=statistics.median(got["cpu"]))
        rows[m]["time_s"], rows[m]["median_s"] = rows[m][f"{clock}_s"], rows[m][f"{clock}_median_s"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="CPU default grid is T=4096,H=512,V=32000 only; --full for the rest.")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    ap.add_argument("--full", action="store_true", help="the whole T x H x V grid (GPU default)")
    ap.add_argument("--shape", action="append", help="T,H,V (repeatable); overrides the grid")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions after one warm-up (median)")
    ap.add_argument("--clock", choices=("cpu", "wall"), default=None,
                    help="time used for ratios: process CPU time (CPU default) or wall time (CUDA: always wall)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak for %% of roofline")
    ap.add_argument("--_worker", choices=("mem", "time"), help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._worker:
        t, h, v = map(int, args.shape[0].split(","))
        if args._worker == "mem":
            print(json.dumps(measure_memory(args.rest[0], t, h, v, args.device)))
        else:
            print(json.dumps(measure_times(args.rest[0].split(","), t, h, v, args.device, args.reps or 3)))
        return 0

    if args.shape:
        shapes = [tuple(map(int, s.split(","))) for s in args.shape]
    elif args.full or args.device == "cuda":
        shapes = FULL_GRID
    else:
        shapes = [(4096, 512, 32000)]
    reps = args.reps or (3 if args.device == "cpu" else 10)
    methods = [m for m in args.methods.split(",") if m]
    clock = "wall" if args.device == "cuda" else (args.clock or "cpu")
    results = []
    for shape in shapes:
        if not _fits(*shape, args.device):
            results.append({"shape": shape, "skipped": "does not fit in memory"})
            continue
        row = {"shape": shape, "methods": run_shape(shape, methods, args.device, reps, clock)}
        base = row["methods"].get("naive", {})
        floor = row["methods"].get("floor", {})
        flops = 6 * shape[0] * shape[1] * shape[2]
        for r in row["methods"].values():
            if "time_s" not in r:
                continue
            if "time_s" in base:
                r["speedup_vs_naive"] = base["time_s"] / r["time_s"]
                if base.get("peak_bytes"):
                    r["memory_vs_naive"] = r["peak_bytes"] / base["peak_bytes"]
            if "time_s" in floor:
                r["time_vs_floor"] = r["time_s"] / floor["time_s"]
            if args.device == "cuda":
                r["roofline_pct"] = 100.0 * flops / r["time_s"] / (args.peak_tflops * 1e12)
        results.append(row)
    doc = {"device": args.device, "reps": reps, "clock": clock, "results": results}
    if args.device == "cpu":
        import torch

        doc["threads"] = torch.get_num_threads()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"device={args.device} clock={clock} reps={reps} (fastest of reps; ratios from the same run)")
    for row in results:
        print(f"T={row['shape'][0]} H={row['shape'][1]} V={row['shape'][2]}" +
              (f": skipped ({row['skipped']})" if "skipped" in row else ""))
        for m, r in row.get("methods", {}).items():
            if "error" in r:
                print(f"  {m:6s} {r['error']}")
                continue
            line = (f"  {m:6s} {r['time_s'] * 1e3:9.1f} ms {clock} (median {r['median_s'] * 1e3:9.1f}, "
                    f"wall {r['wall_s'] * 1e3:9.1f})"
                    f"  peak {r['peak_bytes'] / 2**20:8.1f} MiB")
            if "speedup_vs_naive" in r:
                line += f"  {r['speedup_vs_naive']:5.2f}x naive speed"
            if "memory_vs_naive" in r:
                line += f"  {100 * r['memory_vs_naive']:5.1f}% naive mem"
            if "time_vs_floor" in r:
                line += f"  {r['time_vs_floor']:5.2f}x floor time"
            if "roofline_pct" in r:
                line += f"  {r['roofline_pct']:5.1f}% roofline"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
