"""The seam the RL and reward-model code needs: hidden states before the output layer, and that layer's weight.

The fused log-prob op (`megatron_r1.ops.token_logprobs`) takes hidden states and the (vocab-parallel) output
weight, so it never materialises [tokens × vocab] logits. GPTModel always applies its output layer; this swaps it
for an identity for the duration of a `with` block (and keeps the sequence-parallel gather it would have done).
"""
from __future__ import annotations

import contextlib

import torch


def output_weight(model) -> torch.Tensor:
    """The output layer's weight [V_local, H] (the embedding when they are tied)."""
    if model.share_embeddings_and_output_weights:
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


@contextlib.contextmanager
def hidden_states_output(model):
    """Inside the block, `model(tokens, positions, mask)` returns final hidden states [b, s, H] instead of logits.

    Multi-token prediction is switched off inside the block: RL and reward scoring use the main head only.
    Whatever consumes the hidden states must give each TP rank the full gradient w.r.t. them (the fused ops do:
    they all-reduce the partial gradients of their vocab shards), as a replicated tensor's gradient.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    if not model.post_process:  # earlier pipeline stages return hidden states already
        yield model
        return
    layer = model.output_layer
    original_forward = layer.forward
    sp = getattr(layer, "sequence_parallel", False)

    def identity(hidden, weight=None, runtime_gather_output=None, **unused):
        if sp:
            # Consumers (megatron_r1.ops with tp_group) return the *full* gradient of the hidden states on every
            # TP rank, already summed over the vocab shards; so the gather's backward must only split it back to
            # this rank's sequence chunk, not reduce-scatter (which would sum it TP times).
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        return hidden, None

    saved_mtp = (model.mtp_process, model.config.mtp_num_layers)
    layer.forward = identity
    model.mtp_process = False
    model.config.mtp_num_layers = None
    try:
        yield model
    finally:
        layer.forward = original_forward
        model.mtp_process, model.config.mtp_num_layers = saved_mtp
