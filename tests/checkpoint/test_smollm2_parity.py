"""Greedy parity on real weights: SmolLM2-135M-Instruct converted from its GGUF, decoded by our engine (Python API
and `megatron-r1 serve --load` over HTTP, each using the tokenizer and chat template the checkpoint carries)
gives HF transformers' greedy tokens, and log-probs equal to HF's log-softmax."""
from __future__ import annotations

import pytest
import torch

from tests.checkpoint.smollm2 import needs_smollm2, smollm2_dirs

pytestmark = [needs_smollm2, pytest.mark.slow]  # ~2 min on 2 busy cores, most of it the GGUF conversion
NEW = 32  # new tokens per prompt: 16 x 32 = 512 greedy tokens compared
TEXTS = ["The capital of France is", "1, 2, 3, 4,", "def fibonacci(n):", "Once upon a time",
         "Water boils at", "The quick brown fox", "Q: What is 12 + 5?\nA:", "import numpy as np\n"]
CHATS = [[{"role": "user", "content": "What is 2 + 2?"}],
         [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}]]


def _prompts(tok) -> list[list[int]]:
    """16 prompts from 1 to 400 tokens: plain text, chat-templated messages, a long document."""
    out = [[tok.bos_id], tok.encode("Hello")]
    out += [tok.encode(t) for t in TEXTS]
    out += [tok.apply_chat_template(m) for m in CHATS]
    story = " ".join(f"Step {i}: add {i} apples to the basket." for i in range(40))
    out += [tok.encode(story[:400]), tok.encode(story[:900]), tok.encode(story)[:200], tok.encode(story)[:400]]
    return out


def _hf_greedy(hf_dir, prompts):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            g = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
            ids = g.sequences[0, len(p):].tolist()
            lp = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(g.logits, ids)]
            out.append((ids, lp))
    return out


def test_engine_and_server_greedy_equal_hf(tmp_path):
    import httpx

    from megatron_r1.data.tokenizer import load_tokenizer
    from megatron_r1.inference.cli import build_engine, build_parser
    from megatron_r1.inference.sampling import SamplingParams
    from tests.inference.test_serve_cli import _clean_env, _free_port

    hf_dir, mcore = smollm2_dirs()
    engine, _ = build_engine(build_parser().parse_args(["--load", str(mcore), "--max-batch-size", "4",
                                                        "--max-seq-len", "512"]))
    tok = engine.tokenizer
    assert tok.vocab_size == 49152 and tok.chat_template  # the checkpoint's own, found without --tokenizer
    prompts = _prompts(tok)
    assert len(prompts) == 16 and min(map(len, prompts)) == 1 and max(map(len, prompts)) == 400
    ref = _hf_greedy(hf_dir, prompts)
    got = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW))
    for i, (r, (ids, lp)) in enumerate(zip(got, ref)):
        assert r.token_ids == ids, (i, r.token_ids, ids)
        torch.testing.assert_close(torch.tensor(r.raw_logprobs), torch.tensor(lp), atol=1e-4, rtol=0)
    del engine

    # The same through `megatron-r1 serve --load` (no --tokenizer): completions by text and chat by messages.
    import subprocess
    import sys
    import time

    port = _free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_r1", "serve", "--load", str(mcore), "--port", str(port),
                             "--max-batch-size", "4", "--max-seq-len", "512", "--threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=_clean_env())
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.5)
        hf_tok = load_tokenizer(str(hf_dir))
        for text, (ids, _) in zip(TEXTS[:2], ref[2:4]):
            body = {"model": "mcore", "prompt": text, "max_tokens": NEW, "temperature": 0}
            resp = httpx.post(base + "/v1/completions", json=body, timeout=120).json()
            assert resp["choices"][0]["text"] == hf_tok.decode(ids), resp
        for messages, (ids, _) in zip(CHATS, ref[10:12]):
            body = {"model": "mcore", "messages": messages, "max_tokens": NEW, "temperature": 0}
            resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
            assert resp["choices"][0]["message"]["content"] == hf_tok.decode(ids), resp
            assert resp["usage"]["prompt_tokens"] == len(hf_tok.apply_chat_template(messages))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
