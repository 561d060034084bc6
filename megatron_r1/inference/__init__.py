"""In-engine generation on the trainer's Megatron model: KV-cached continuous batching, sampling with log-probs,
weight refit, and an OpenAI-compatible HTTP server (`megatron-r1 serve`)."""
from megatron_r1.inference.engine import Engine, GenerationResult, QueueFullError
from megatron_r1.inference.sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "QueueFullError", "SamplingParams"]
