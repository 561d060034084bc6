"""Generation throughput: our engine vs HF transformers `generate` on the same dense model and weights.

Tokens/s at batch 1, 8, 32 with 64 new tokens (greedy, no early stop), both in this process on the same
threads, fp32 unless --precision says otherwise; prints the ratio engine / HF per batch size (HF time / engine
time, each the best of --repeats runs, the two alternating) and the load average before and after. The model is a
Llama-shaped Megatron GPTModel (preset
`llama_tiny` by default, or a wider one via --hidden/--layers) copied into an HF LlamaForCausalLM by
megatron_r1.inference.hf_llama.to_hf. On a GPU it also reports decode's share of the memory-bandwidth roofline.

    python tools/bench_generation.py [--preset llama_tiny] [--batches 1 8 32] [--new-tokens 64] [--prompt-len 32]
                                     [--threads 1 --clock cpu]   # on a shared CPU machine

Figures and what bounds them: docs/benchmarks.md, "Generation (CPU)".
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
    ap.add_argument("--hidden", type=int, default=None, help="override hidden size (heads keep head_dim 32)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per setting (best is kept)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (robust on a shared, oversubscribed machine; use --threads 1)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megatron_r1.config import ParallelConfig
    from megatron_r1.inference import Engine, SamplingParams
    from megatron_r1.inference.hf_llama import to_hf
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

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
    print("load average (1/5/15 min) at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    gen = torch.Generator().manual_seed(0)
    rows = []
    max_b = max(args.batches)
    engine = Engine(model, max_batch_size=max_b, max_seq_len=args.prompt_len + args.new_tokens + 1)
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    reason = engine.fn.fused_decode_reason()
    fused = engine.fn.use_fused and engine.fn.fused_decode_step() is not None  # None where `reason` is set
    print("engine decode step: " + ("fused CPU step (csrc/cpu_decode.cpp)" if fused else
                                    f"torch ops ({reason or 'fused step off or not built'})"))
    for b in args.batches:
        prompts = torch.randint(0, m_cfg.vocab_size, (b, args.prompt_len), generator=gen)

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
    if device.type == "cuda":
        _roofline(model, engine, rows, args)
    return rows


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
