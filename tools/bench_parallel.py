"""Step time and peak memory per rank of the tiny DeepSeek-V3 at TP=1/2 and EP=1/2, as ratios to TP=1.

    python tools/bench_parallel.py [--steps 5] [--warmup 2] [--layouts tp1,tp2,ep2,tp2ep2] [--seq 128] \
        [model.key=value ...]

Each layout runs in its own set of spawned gloo ranks (one CPU thread per rank) through the real training step
(Megatron DDP, forward_backward_func, Adam), with the same global batch, so a layout's step time is the time of
the same work split differently. Peak memory is each rank's peak resident set size (getrusage ru_maxrss: the
whole process, Python and imports included) and the growth over the RSS measured just before the model was
built (what the model, optimizer and activations add). On a shared 2-core CPU the numbers show overheads
(communication, duplicated work), not speed-ups; on GPUs run it with torchrun-sized layouts.
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time

LAYOUTS = {  # name: (tp, ep, world size)
    "tp1": (1, 1, 1),
    "tp2": (2, 1, 2),
    "ep2": (1, 2, 2),
    "tp2ep2": (2, 2, 4),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _rank_main(rank, world, port, tp, ep, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, _bench_rank(tp, ep, args)))
    except BaseException as e:  # report to the parent instead of hanging it
        import traceback

        queue.put((rank, {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _bench_rank(tp: int, ep: int, args) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_r1.config import config_from_dict
    from megatron_r1.parallel import init_parallel
    from megatron_r1.training import build_train_state, train_step

    cfg = config_from_dict({}, [
        "model.preset=deepseek_v3_tiny", f"model.seq_length={args.seq}", "training.precision=fp32",
        f"training.micro_batch_size={args.micro_batch}", f"training.global_batch_size={args.global_batch}",
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.expert_model_parallel_size={ep}",
        "optimizer.lr_warmup_steps=0",
    ] + list(args.overrides))
    ctx = init_parallel(cfg.parallel, cfg.training.seed)
    rss_before = _rss_mb()
    state = build_train_state(cfg, ctx, total_steps=args.warmup + args.steps)
    vocab, seq, mb = cfg.model.vocab_size, cfg.model.seq_length, cfg.training.micro_batch_size
    n_micro = cfg.training.global_batch_size // (mb * ctx.dp_size)
    g = torch.Generator().manual_seed(0)

    def forward_step(data_iterator, model):
        tokens = next(data_iterator)
        positions = torch.arange(seq).unsqueeze(0).expand_as(tokens)
        out = model(tokens, positions, None, labels=tokens.roll(-1, dims=1))

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    times = []
    for step in range(args.warmup + args.steps):
        batches = [torch.randint(0, vocab, (mb, seq), generator=g) for _ in range(n_micro)]
        dist.barrier()  # every rank starts the step together: the slowest rank sets the step time
        t0 = time.perf_counter()
        train_step(state, forward_step, iter(batches), n_micro, seq, mb)
        dist.barrier()
        state.step += 1
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    params = sum(p.numel() for p in state.model[0].parameters())
    return {"step_s": statistics.median(times), "peak_rss_mb": peak_mb, "growth_mb": peak_mb - rss_before,
            "params": params, "tp_rank": ctx.tp_rank, "ep_rank": ctx.ep_rank, "dp_rank": ctx.dp_rank}


def run_layout(name: str, args) -> list[dict]:
    import torch.multiprocessing as mp

    tp, ep, world = LAYOUTS[name]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, tp, ep, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, res = queue.get(timeout=args.timeout)
            if "error" in res:
                raise RuntimeError(f"{name} rank {rank} failed:\n{res['error']}")
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="tp1,tp2,ep2,tp2ep2", help=f"comma-separated, from {', '.join(LAYOUTS)}")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden_size=128")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from {list(LAYOUTS)}")
    if "tp1" not in names:
        names.insert(0, "tp1")  # the baseline every ratio refers to, measured in this run

    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = run_layout(name, args)
        print(f"# {name}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    base = results["tp1"][0]
    print(f"tiny DeepSeek-V3 (preset deepseek_v3_tiny, seq {args.seq}, global batch {args.global_batch}, "
          f"micro batch {args.micro_batch}), {args.steps} timed steps (median), 1 thread per rank, "
          f"{os.cpu_count()} CPUs")
    header = (f"{'layout':<8} {'rank':>4} {'tp/ep/dp':>8} {'params':>9} {'step s':>8} {'x tp1':>6} "
              f"{'peak MB':>8} {'x tp1':>6} {'model+act MB':>12} {'x tp1':>6}")
    print(header)
    print("-" * len(header))
    for name, ranks in results.items():
        for r, res in enumerate(ranks):
            ranks = f"{res['tp_rank']}/{res['ep_rank']}/{res['dp_rank']}"
            print(f"{name:<8} {r:>4} {ranks:>8} {res['params']:>9} "
                  f"{res['step_s']:>8.3f} {res['step_s'] / base['step_s']:>6.2f} "
                  f"{res['peak_rss_mb']:>8.0f} {res['peak_rss_mb'] / base['peak_rss_mb']:>6.2f} "
                  f"{res['growth_mb']:>12.0f} {res['growth_mb'] / max(base['growth_mb'], 1e-9):>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
