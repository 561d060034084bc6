"""Engine behaviour: cached greedy = full-sequence argmax, log-probs = the trainer's, sampling controls,
continuous batching with slot reuse, stops, refit."""
import time

import pytest
import torch

from megatron_r1.errors import UserError
from megatron_r1.inference import Engine, SamplingParams

from .conftest import make_model


def _prompts(n, seed=0, lo=3, hi=14):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def _full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq]), torch.arange(len(seq))[None], None)[0]


def _assert_greedy(model, prompt, tokens, start=0):
    """tokens[start:] are the step-by-step argmax continuation of prompt + tokens[:start]. One causal full forward
    gives every step's logits (position i only sees tokens <= i), the same as recomputing at each step."""
    seq = list(prompt) + list(tokens)
    argmax = _full_logits(model, seq).argmax(-1)
    for j in range(start, len(tokens)):
        assert argmax[len(prompt) + j - 1].item() == tokens[j], f"step {j}"


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "llama_tiny", "qwen2_tiny"])
def test_greedy_with_cache_equals_stepwise_full_argmax(models, preset):
    """More prompts than slots: requests join and leave the running batch while others decode."""
    model = models[preset]
    engine = Engine(model, max_batch_size=3, max_seq_len=64)
    prompts = _prompts(7, seed=1)
    results = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=8))
    for p, r in zip(prompts, results):
        assert r.finish_reason == "length" and len(r.token_ids) == 8
        _assert_greedy(model, p, r.token_ids)
    assert engine.num_running == 0 and engine.num_waiting == 0


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "llama_tiny"])
def test_logprobs_equal_trainer_logprobs(models, preset):
    """Returned log-probs = the trainer's recompute (megatron_r1.ops) on the same tokens at the same temperature."""
    from megatron_r1.ops.reference import logprobs_from_logits

    model = models[preset]
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    prompts = _prompts(5, seed=2)
    temp = 0.7
    results = engine.generate(prompts, SamplingParams(temperature=temp, max_tokens=10, seed=5))
    worst = 0.0
    for p, r in zip(prompts, results):
        seq = p + r.token_ids
        logits = _full_logits(model, seq)[len(p) - 1:-1]
        tokens = torch.tensor(r.token_ids)
        trainer = logprobs_from_logits(logits, tokens, temperature=temp)
        trainer_raw = logprobs_from_logits(logits, tokens, temperature=1.0)
        worst = max(worst, (trainer - torch.tensor(r.logprobs)).abs().max().item(),
                    (trainer_raw - torch.tensor(r.raw_logprobs)).abs().max().item())
    print(f"\n{preset}: max |engine - trainer| log-prob difference {worst:.2e}")
    assert worst < 2e-5  # observed ~6e-6 (MLA+MoE) and ~2e-6 (dense) in fp32 on CPU


def test_seed_gives_same_text_regardless_of_batch(models):
    engine = Engine(models["llama_tiny"], max_batch_size=8, max_seq_len=64)
    prompts = _prompts(3, seed=3)
    sp = SamplingParams(temperature=1.0, seed=11, max_tokens=12)
    alone = engine.generate(prompts[:1], sp)[0]
    mixed = engine.generate(prompts + prompts, [sp] + [SamplingParams(temperature=1.2, max_tokens=5)] * 5)[0]
    other = engine.generate(prompts[:1], SamplingParams(temperature=1.0, seed=12, max_tokens=12))[0]
    assert alone.token_ids == mixed.token_ids
    assert alone.token_ids != other.token_ids


def test_top_k_one_is_greedy_and_top_p_restricts(models):
    engine = Engine(models["llama_tiny"], max_batch_size=4, max_seq_len=64)
    prompts = _prompts(4, seed=4)
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    k1 = engine.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=6, seed=1))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in k1]
    # a tiny nucleus keeps only the most likely token as well
    p_small = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=6, seed=2))
    assert [r.token_ids for r in greedy] == [r.token_ids for r in p_small]


def test_temperature_sampling_matches_distribution():
    """Empirical frequencies of the sampler follow softmax(logits / T) (exponential-race correctness)."""
    from megatron_r1.inference.sampling import sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    toks, lp, _ = sample(logits, [SamplingParams(temperature=0.5)] * 4000, [None] * 4000, gen)
    freq = torch.bincount(toks, minlength=4).float() / 4000
    expect = torch.softmax(logits[0] / 0.5, -1)
    assert (freq - expect).abs().max() < 0.03
    assert torch.allclose(lp, expect.log()[toks])


def test_stop_token_ids_and_stop_strings(models):
    from megatron_r1.data.tokenizer import load_tokenizer

    tok = load_tokenizer("builtin:demo")
    engine = Engine(models["llama_tiny"], tokenizer=tok, max_batch_size=4, max_seq_len=64)
    prompt = tok.encode("What is 2 plus 3?")
    free = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop_id = free.token_ids[4]
    r = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id],
                                                 ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.token_ids[-1] == stop_id and stop_id not in r.token_ids[:-1]
    # a stop string: cut the text at its first occurrence (excluded), finish "stop"
    stop_text = tok.decode([t for t in free.token_ids[3:5] if t < tok.vocab_size])  # model vocab > tokenizer's
    if stop_text.strip():
        r = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop_text],
                                                     ignore_eos=True))[0]
        assert r.finish_reason == "stop" and stop_text not in r.text
        assert free.text.startswith(r.text)


def test_context_limit_and_bad_requests(models):
    engine = Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=16)
    r = engine.generate([list(range(10))], SamplingParams(temperature=0, max_tokens=100))[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 6  # 10 + 6 = the 16-token context
    with pytest.raises(UserError, match="context"):
        engine.add_request(list(range(16)))
    with pytest.raises(UserError, match="max_tokens"):
        engine.add_request([1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(UserError, match="token ids"):
        engine.add_request([1, 10_000])


def test_abort_frees_slot_and_queue_bound(models):
    from megatron_r1.inference import QueueFullError

    engine = Engine(models["llama_tiny"], max_batch_size=2, max_seq_len=64, max_queue=2)
    a = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50))
    b = engine.add_request([4, 5], SamplingParams(max_tokens=50))
    with pytest.raises(QueueFullError):
        engine.add_request([6])
    engine.step()
    assert engine.num_running == 2
    engine.abort(a)
    engine.step()
    assert a.result.finish_reason == "abort" and engine.num_running == 1
    c = engine.add_request([7, 8, 9], SamplingParams(temperature=0, max_tokens=3))
    while not c.done.is_set():
        engine.step()
    # the moved request (b) kept its cache: its continuation still equals greedy-from-scratch semantics
    assert c.result.finish_reason == "length"
    engine.abort(b)
    engine.step()
    assert engine.num_running == 0


def test_refit_shared_parameters_after_optimizer_step(parallel_tp1):
    """Trainer and engine share parameters: an optimizer step is served after refit() with no copy."""
    model = make_model("deepseek_v3_tiny", seed=5)
    engine = Engine(model, max_batch_size=4, max_seq_len=64)
    prompts = _prompts(3, seed=6)
    sp = SamplingParams(temperature=0, max_tokens=6)
    before = engine.generate(prompts, sp)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    # one optimizer step on a language-modelling loss
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    seq = torch.tensor([prompts[0] + before[0].token_ids])
    logits = model(seq, torch.arange(seq.shape[1])[None], None)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], seq[0, 1:])
    loss.backward()
    opt.step()
    dt = engine.refit()
    print(f"\nrefit (shared parameters): {dt * 1e6:.1f} us")
    assert engine.weight_version == 1
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # nothing was copied or re-pointed
    after = engine.generate(prompts, sp)
    assert after[0].weight_version == 1
    for p, r in zip(prompts, after):
        _assert_greedy(model, p, r.token_ids)
    assert [r.token_ids for r in before] != [r.token_ids for r in after]


def test_refit_copy_from_other_layout_and_inflight_requests(parallel_tp1):
    """Engine with its own model: refit copies the trainer's weights in memory (module or full state dict);
    a request in flight is re-prefilled on the new weights."""
    from megatron_r1.inference import weights

    trainer = make_model("llama_tiny", seed=7)
    engine_model = make_model("llama_tiny", seed=8)
    engine = Engine(engine_model, max_batch_size=2, max_seq_len=64)
    prompt = _prompts(1, seed=9)[0]
    req = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=10))
    for _ in range(3):
        engine.step()
    n_old = len(req.tokens)  # the first step prefills and decodes: 2 tokens, then 1 per step
    assert n_old == 4
    t0 = time.perf_counter()
    dt = engine.refit(trainer)  # same layout: parameter-wise copy
    print(f"\nrefit (in-memory copy, {sum(p.numel() for p in trainer.parameters())} params): {dt * 1e3:.2f} ms")
    assert time.perf_counter() - t0 < 5
    for n, p in engine_model.named_parameters():
        assert torch.equal(p, dict(trainer.named_parameters())[n])
    while not req.done.is_set():
        engine.step()
    # tokens after the refit come from the trainer's weights
    _assert_greedy(trainer, prompt, req.result.token_ids, start=n_old)
    # a full (unsharded) state dict works too, and a mismatched one is refused with a clear error
    other = make_model("llama_tiny", seed=10)
    engine.refit(weights.full_state_dict(other))
    assert torch.equal(engine_model.decoder.layers[0].mlp.linear_fc1.weight,
                       other.decoder.layers[0].mlp.linear_fc1.weight)
    from megatron_r1.errors import CheckpointError

    with pytest.raises(CheckpointError, match="differ"):
        engine.refit(make_model("qwen2_tiny", seed=1))


def test_background_thread_serves_generate(models):
    engine = Engine(models["llama_tiny"], max_batch_size=4, max_seq_len=64)
    engine.start()
    try:
        res = engine.generate(_prompts(6, seed=12), SamplingParams(temperature=0, max_tokens=4))
        assert all(len(r.token_ids) == 4 for r in res)
    finally:
        engine.stop()


@pytest.mark.parametrize("preset", ["deepseek_v3_tiny", "llama_tiny"])
def test_shared_prompt_prefilled_once(models, preset):
    """GRPO asks for G samples of one prompt: it is prefilled once and its cache rows (MLA latents or dense K/V)
    copied to the other G - 1; tokens equal the unshared path's (same seeds), prefill work is counted as saved."""
    model = models[preset]
    prompts = _prompts(2, seed=13)
    G = 3
    group_prompts = [p for p in prompts for _ in range(G)]
    params = [SamplingParams(temperature=1.0, max_tokens=8, seed=100 + i) for i in range(len(group_prompts))]
    shared = Engine(model, max_batch_size=8, max_seq_len=64)
    got = shared.generate(group_prompts, params)
    # the unshared reference: each request alone (nothing to share), same seeds
    alone = Engine(model, max_batch_size=8, max_seq_len=64)
    ref = [alone.generate([p], [sp])[0] for p, sp in zip(group_prompts, params)]
    assert alone.stats["prefill_tokens_shared"] == 0
    for r, e in zip(got, ref):
        assert r.token_ids == e.token_ids
        assert max(abs(a - b) for a, b in zip(r.logprobs, e.logprobs)) < 1e-5
    assert len({tuple(r.token_ids) for r in got}) > 2  # the seeds differ, so do the samples
    assert shared.stats["prefill_tokens_shared"] == (G - 1) * sum(len(p) for p in prompts)
    assert shared.stats["prompt_tokens"] == alone.stats["prompt_tokens"] == G * sum(len(p) for p in prompts)
    # greedy copies of one prompt equal the step-by-step full-sequence argmax (the copied cache is right)
    greedy = shared.generate([prompts[0]] * G, SamplingParams(temperature=0, max_tokens=6))
    for r in greedy:
        _assert_greedy(model, prompts[0], r.token_ids)


def test_failed_prefill_fails_its_requests_instead_of_losing_them(models, monkeypatch):
    """A step that raises during prefill finishes the requests it admitted with "error" (clients do not hang),
    and the engine serves the next requests."""
    engine = Engine(models["llama_tiny"], max_batch_size=4, max_seq_len=64)
    real = engine.fn.prefill

    def broken(*args, **kwargs):
        monkeypatch.setattr(engine.fn, "prefill", real)  # fail once
        raise RuntimeError("injected prefill failure")

    monkeypatch.setattr(engine.fn, "prefill", broken)
    engine.start()
    try:
        reqs = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=3)) for p in _prompts(2, seed=14)]
        assert all(r.done.wait(timeout=30) for r in reqs)
        assert [r.result.finish_reason for r in reqs] == ["error", "error"]
        assert engine.stats["failed_steps"] == 1
        ok = engine.generate(_prompts(1, seed=15), SamplingParams(temperature=0, max_tokens=3))[0]
        assert ok.finish_reason == "length" and len(ok.token_ids) == 3
    finally:
        engine.stop()
