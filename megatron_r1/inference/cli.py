"""`megatron-r1 serve`: the OpenAI-compatible server on a checkpoint or a randomly initialised preset."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile

from megatron_r1.config import ParallelConfig, load_config
from megatron_r1.data.tokenizer import tokenizer_for_checkpoint
from megatron_r1.errors import UserError
from megatron_r1.inference.engine import Engine
from megatron_r1.inference.tokenizer import DEEPSEEK_NAMES, deepseek_v3_tokenizer_path, load_tokenizer
from megatron_r1.models import build_model, get_preset
from megatron_r1.parallel import init_parallel

log = logging.getLogger("megatron_r1.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-r1 serve", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--load", help="checkpoint directory (training checkpoint or model-only)")
    src.add_argument("--preset", help="model preset with random weights (tests, benchmarks), e.g. deepseek_v3_tiny")
    p.add_argument("--model-preset", help="with --load: the preset of a checkpoint saved without its config")
    p.add_argument("--tokenizer", default=None,
                   help="builtin:demo | a directory or tokenizer.json | deepseek_v3 (needs litellm); "
                        "default: the tokenizer the checkpoint carries, else its config's, else builtin:demo")
    p.add_argument("--served-model-name", default=None, help="the `model` clients must name (default: preset or "
                                                             "checkpoint directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=32, help="cache slots: requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which the server answers 503")
    p.add_argument("--max-seq-len", type=int, default=None, help="context (default: the model's max positions)")
    p.add_argument("--kv-cache", choices=("auto", "paged", "contiguous"), default="auto",
                   help="KV cache kind (generation.kv_cache): auto = contiguous rows where the fused CPU decode step "
                        "applies (dense fp32 on CPU), paged elsewhere")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None,
                   help="KV cache budget in GiB (generation.kv_cache_memory_gb): the paged pool's size, or the most "
                        "the contiguous cache grows to; default: paged = max batch x context, contiguous = what the "
                        "running requests need")
    p.add_argument("--kv-block-size", type=int, default=16, help="tokens per paged-cache block")
    p.add_argument("--max-n", type=int, default=16, help="largest `n` (choices per request) accepted")
    p.add_argument("--seed", type=int, default=1234, help="weights seed (random init) and unseeded sampling")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def _model_config(args):
    """(ModelConfig, the tokenizer path the checkpoint's config.yaml records, or None)."""
    if args.preset:
        return get_preset(args.preset, where="--preset"), None
    from megatron_r1.checkpoint import checkpoint_config_yaml

    if not os.path.exists(args.load):
        raise UserError(f"--load {args.load}: no such directory")
    text = checkpoint_config_yaml(args.load)
    if text is None:
        if not args.model_preset:
            raise UserError(f"--load {args.load}: the checkpoint has no config.yaml; pass --model-preset NAME")
        return get_preset(args.model_preset, where="--model-preset"), None
    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        cfg = load_config(f.name, ["checkpoint.save=null", "checkpoint.load=null", "tokenizer.path=builtin:demo"])
    finally:
        os.unlink(f.name)
    return cfg.model, ((yaml.safe_load(text) or {}).get("tokenizer") or {}).get("path")


def tokenizer_spec(args, model_cfg, recorded: str | None) -> str:
    """--tokenizer, else the tokenizer the checkpoint carries, else the one its config records, else the demo
    tokenizer; one that cannot be the checkpoint's (another vocabulary) is a UserError naming both."""
    explicit = args.tokenizer
    if explicit in DEEPSEEK_NAMES:
        explicit = str(deepseek_v3_tokenizer_path())
    return tokenizer_for_checkpoint(explicit, args.load, model_cfg.vocab_size, "--tokenizer", fallback=recorded)


def build_engine(args):
    """The engine (model built, weights loaded or random) and the served model name."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg, recorded = _model_config(args)
    spec = tokenizer_spec(args, model_cfg, recorded)
    tokenizer = load_tokenizer(spec)
    log.info("tokenizer: %s (%d tokens%s)", spec, tokenizer.vocab_size,
             ", chat template" if getattr(tokenizer, "chat_template", None) else "")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        if args.load:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model {model_cfg.vocab_size}")
        model_cfg.vocab_size = tokenizer.vocab_size  # random init: size the preset's vocab to the tokenizer
    parallel = ParallelConfig()
    init_parallel(parallel, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg, parallel, "auto").eval()
    if args.load:
        from megatron_r1.checkpoint import load_model_only

        load_model_only(model, args.load)
    engine = Engine(model, tokenizer=tokenizer, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                    max_queue=args.max_queue, seed=args.seed, kv_cache=args.kv_cache,
                    kv_cache_memory_gb=args.kv_cache_memory_gb, kv_block_size=args.kv_block_size)
    name = args.served_model_name or args.preset or os.path.basename(os.path.normpath(args.load))
    return engine, name


def serve_main(argv: list[str]) -> int:
    """Entry point of `megatron-r1 serve` (argv without the command name)."""
    import uvicorn

    from megatron_r1.inference.server import create_app

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine, name = build_engine(args)
    log.info("serving %s on http://%s:%d (max batch %d, context %d, queue %d)", name, args.host, args.port,
             args.max_batch_size, engine.max_seq_len, args.max_queue)
    app = create_app(engine, name, max_n=args.max_n)
    # uvicorn turns SIGTERM into a graceful shutdown (stop accepting, finish responses, run the lifespan exit,
    # which stops the engine thread) and then re-raises the signal to the handler found before it started: make
    # that one record the signal instead of killing the process, so a terminated server exits 0 after cleanup.
    received = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: received.append(sig))
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("server stopped%s", " (SIGTERM)" if received else "")
    return 0
