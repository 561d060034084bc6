"""In-engine generation on the trainer's Megatron model: KV-cached continuous batching, sampling with log-probs,
weight refit, and an OpenAI-compatible HTTP server (`megatron-r1 serve`).

How the RL loop uses it (same process, same parallel groups as the trainer; every TP/EP rank makes the same calls):

    engine = Engine(policy_model, tokenizer=tok, max_batch_size=64, max_seq_len=prompt_len + response_len)
    results = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_tokens=response_len, seed=s))
    # (G copies of a prompt submitted together are prefilled once: engine.stats["prefill_tokens_shared"])
    # results[i].token_ids, .logprobs (behaviour log-probs at the sampling temperature: the TIS denominator),
    # .raw_logprobs (temperature 1), .text, .finish_reason ("stop" | "length"), .weight_version
    ...  # rewards, advantages, policy loss, optimizer.step()
    engine.refit()  # parameters are shared with the trainer: no copy, bumps weight_version, drops cached K/V
    # an engine on its own model copy (other dtype / TP layout): engine.refit(weights.full_state_dict(trainer))

The trainer recomputes log-probs with megatron_r1.ops at the same temperature; when the engine masks the padded
vocabulary (it does when it has a tokenizer, or with Engine(vocab_size=...)), the trainer must mask it too; to
sample over the whole padded vocabulary instead, pass vocab_size=model.vocab_size (see sampling.py).
"""
from megatron_r1.inference.engine import Engine, GenerationResult, QueueFullError
from megatron_r1.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "QueueFullError", "SamplingParams"]
