"""`megatron-r1 serve` as a real process: it serves, and SIGTERM shuts it down cleanly (exit code 0)."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from .test_server import _free_port


def _clean_env():
    # this pytest process may hold a torch.distributed rendezvous (RANK, MASTER_PORT...): the server is a fresh,
    # single-process job and must pick its own
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONUNBUFFERED": "1"}


def _start(tmp_path):
    """The server process and its URL; a port taken between choosing and binding it (CI machines running other
    tests) is retried with another port."""
    for attempt in range(3):
        port = _free_port()
        log = open(tmp_path / "serve.log", "w+")
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_r1", "serve", "--preset", "llama_tiny", "--tokenizer", "builtin:demo",
             "--port", str(port), "--max-batch-size", "4", "--max-seq-len", "128", "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                text = open(tmp_path / "serve.log").read()
                if "address already in use" in text and attempt < 2:
                    break
                raise AssertionError(text)
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                proc.kill()
                raise AssertionError("server did not come up")
            time.sleep(0.2)
    raise AssertionError("no free port")


@pytest.mark.slow
def test_serve_preset_and_sigterm(tmp_path):
    proc, base = _start(tmp_path)
    try:
        r = httpx.post(base + "/v1/completions", json={"model": "llama_tiny", "prompt": "What is 2 plus 3?",
                                                       "max_tokens": 4}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, open(tmp_path / "serve.log").read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "server stopped" in open(tmp_path / "serve.log").read()


def test_serve_cli_user_errors(capsys):
    from megatron_r1.cli import main

    assert main(["serve", "--preset", "no_such_model"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["serve", "--load", "/nonexistent/ckpt"]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_serve_load_checkpoint(parallel_tp1, tmp_path):
    """`serve --load`: weights come from a model-only checkpoint (megatron_r1.checkpoint), not a random init."""
    from megatron_r1.checkpoint import save_model_only
    from megatron_r1.inference.cli import build_engine, build_parser

    from .conftest import make_model

    model = make_model("llama_tiny", seed=41)
    save_model_only(model, tmp_path / "ckpt")
    args = build_parser().parse_args(["--load", str(tmp_path / "ckpt"), "--model-preset", "llama_tiny"])
    engine, name = build_engine(args)
    assert name == "ckpt"
    for (n, a), b in zip(model.named_parameters(), engine.model.parameters()):
        assert torch.equal(a, b), n


def test_serve_kv_cache_flags(parallel_tp1):
    """The defaults allocate no [slots x context] cache up front (#21); --kv-cache / --kv-cache-memory-gb /
    --kv-block-size reach the engine."""
    from megatron_r1.inference.cli import build_engine, build_parser
    from megatron_r1.inference.paged_cache import blocks_for_memory

    base = ["--preset", "llama_tiny", "--tokenizer", "builtin:demo"]
    engine, _ = build_engine(build_parser().parse_args(base + ["--kv-cache", "contiguous"]))
    assert not engine.cache.paged and engine.cache.nbytes() == 0 and engine.max_batch_size == 32
    engine, _ = build_engine(build_parser().parse_args(
        base + ["--kv-cache", "paged", "--kv-cache-memory-gb", "0.01", "--kv-block-size", "8"]))
    token_bytes = engine.cache.bytes_per_token()
    assert engine.cache.paged and engine.cache.block_size == 8
    assert engine.cache.num_blocks == blocks_for_memory(0.01, 8, token_bytes)
    engine, _ = build_engine(build_parser().parse_args(base + ["--kv-cache-memory-gb", "0.01"]))
    assert engine.cache.nbytes() <= 0.01 * 2 ** 30
