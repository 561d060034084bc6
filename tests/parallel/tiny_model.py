"""The tiny DeepSeek-V3 and the helpers the parity, checkpoint and benchmark code share.

Everything here runs inside spawned ranks (tests/distributed.py) or a single process; nothing is a test itself.
Sharding by hand (`shard_for_rank` / `assemble`) follows Megatron's own rules — a tensor-parallel parameter is
split evenly along its `partition_dim`, gated-linear-unit weights (SwiGLU `linear_fc1`) split the gate and the up
halves separately, experts are numbered `ep_rank * local_experts + i`, and pipeline stages hold the layers whose
`layer_number` they report — so parallelism is checked without going through dist_checkpointing.
"""
from __future__ import annotations

import re

import torch

from tests.presets import as_overrides, tiny_deepseek_v3

SEQ = 32
MICRO_BATCH = 2
NUM_MICRO = 4  # micro-batches of one global batch at data-parallel size 1
VOCAB = 256

TINY = as_overrides(tiny_deepseek_v3(
    # the preset's 4 layers (pipeline stages of 2) and 4 heads (split by TP=2)
    num_layers=4, num_attention_heads=4, vocab_size=VOCAB, seq_length=SEQ, max_position_embeddings=64,
    original_max_position_embeddings=32, rotary_scaling_factor=2.0)) + [
    "training.precision=fp32", f"training.micro_batch_size={MICRO_BATCH}",
    f"training.global_batch_size={MICRO_BATCH * NUM_MICRO}",
    # No warm-up: the first step already moves the weights, so step 2 checks the optimizer update too.
    "optimizer.lr_warmup_steps=0", "optimizer.lr=0.01", "optimizer.min_lr=0.001",
    # Large bias update rate so the aux-loss-free balancing visibly moves the expert bias in one step.
    "model.moe_router_bias_update_rate=0.01",
]


def tiny_config(tp: int = 1, pp: int = 1, ep: int = 1, mtp: bool = False, extra: tuple = ()):
    from megatron_r1.config import config_from_dict

    overrides = list(TINY) + [
        f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
        f"parallel.expert_model_parallel_size={ep}",
    ]
    if mtp:
        overrides.append("model.mtp_num_layers=1")
    return config_from_dict({}, overrides + list(extra))


def global_batches(num_steps: int, seed: int = 0) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per step, the NUM_MICRO micro-batches (tokens, labels) of one global batch; same on every rank."""
    g = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(num_steps):
        rows = torch.randint(0, VOCAB, (NUM_MICRO, MICRO_BATCH, SEQ + 1), generator=g)
        steps.append([(r[:, :-1].contiguous(), r[:, 1:].contiguous()) for r in rows])
    return steps


def rank_micro_batches(batches: list, dp_rank: int, dp_size: int) -> list:
    """This data-parallel rank's contiguous share of a global batch's micro-batches."""
    per = len(batches) // dp_size
    return batches[dp_rank * per:(dp_rank + 1) * per]


def forward_step(data_iterator, model):
    """Megatron forward step: next-token loss (mean over tokens) of one micro-batch; MTP adds its own loss."""
    tokens, labels = next(data_iterator)
    # MTP rolls the position ids to its next-token offset, so they must be given even though MLA's rope does not
    # read them.
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    out = model(tokens, positions, None, labels=labels)

    def loss_func(per_token):
        loss = per_token.float().mean()
        # A copy: Megatron's schedule divides the returned loss by the number of micro-batches in place, which
        # would also scale a metric that shares its storage.
        return loss, {"loss": loss.detach().clone()}

    return out, loss_func


def run_steps(state, steps: list, after_step=None) -> list:
    """Run one train_step per global batch in `steps` on this rank; returns the StepResults (loss NaN off the
    last stage). `after_step(state)` is called after each step, e.g. to record that step's gradients."""
    from megatron_r1.training import train_step

    ctx = state.ctx
    results = []
    for batches in steps:
        mine = rank_micro_batches(batches, ctx.dp_rank, ctx.dp_size)
        results.append(train_step(state, forward_step, iter(mine), len(mine), SEQ, MICRO_BATCH))
        state.step += 1  # train_step leaves counting to the caller (a stage may skip or repeat)
        state.consumed_samples += MICRO_BATCH * NUM_MICRO
        if after_step is not None:
            after_step(state)
    return results


def pack(obj) -> bytes:
    """Results with tensors, as bytes: torch's multiprocessing queue would share tensor storage through file
    descriptors that die with the rank process before the parent reads them."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=False)


# ------------------------------------------------------------------------------------------- hand sharding
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _is_expert(name: str) -> bool:
    return ".local_experts." in name


def _is_glu_fc1(name: str) -> bool:
    return name.endswith("linear_fc1.weight")  # every MLP here is SwiGLU (gated_linear_unit=True)


def reference_name(model, name: str) -> str:
    """The single-process name of this rank's parameter `name` (global layer and expert numbers)."""
    from megatron.core import parallel_state as ps

    m = _LAYER.match(name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[m.end():]
    m = _EXPERT.search(name)
    if m:
        n_local = model.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        global_idx = ps.get_expert_model_parallel_rank() * n_local + int(m.group(1))
        name = name[:m.start()] + f".local_experts.{global_idx}." + name[m.end():]
    return name


def _tp(name: str) -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    if _is_expert(name):
        return ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _slice(full: torch.Tensor, dim: int, rank: int, size: int, glu: bool) -> torch.Tensor:
    if glu:  # [gate; up] stacked along dim 0: each TP rank holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0)
    return full.chunk(size, dim)[rank]


def _join(parts: list[torch.Tensor], dim: int, glu: bool) -> torch.Tensor:
    if glu:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], dim), torch.cat([h[1] for h in halves], dim)], 0)
    return torch.cat(parts, dim)


def shard_for_rank(model, reference: dict) -> int:
    """Copy this rank's shard of every parameter (and expert bias) from the full `reference` state dict."""
    n = 0
    with torch.no_grad():
        for name, local in list(model.named_parameters()) + _expert_bias_buffers(model):
            full = reference[reference_name(model, name)]
            if full.shape == local.shape:
                local.copy_(full)
            else:
                rank, size = _tp(name)
                dim = local.partition_dim
                assert full.shape[dim] == local.shape[dim] * size, (name, full.shape, local.shape, size)
                local.copy_(_slice(full, dim, rank, size, _is_glu_fc1(name) and dim == 0))
            n += 1
    return n


def _expert_bias_buffers(model) -> list:
    return [(n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias")]


def local_pieces(model, what: str = "grad") -> list[tuple]:
    """This rank's pieces to assemble in the parent: (reference name, TP dim or None, TP rank, GLU, tensor).

    `what`: "grad" (DDP's main_grad after the step), "param" (weights) or "bias" (router expert biases).
    Needs `remember_full_shapes` first: a piece smaller than the full tensor is a TP shard.
    """
    pieces = []
    items = _expert_bias_buffers(model) if what == "bias" else list(model.named_parameters())
    for name, t in items:
        value = t.main_grad if what == "grad" else t
        ref = reference_name(model, name)
        split = tuple(t.shape) != tuple(model._full_shapes[ref])
        dim = t.partition_dim if split else None
        rank = _tp(name)[0] if split else 0
        pieces.append((ref, dim, rank, _is_glu_fc1(name) and dim == 0, value.detach().clone()))
    return pieces


def assemble(per_rank_pieces: list[list[tuple]], replicated_atol: float = 1e-6) -> dict:
    """Full tensors from every rank's pieces; replicated copies must agree (else the layout is inconsistent)."""
    groups: dict = {}
    for pieces in per_rank_pieces:
        for name, dim, rank, glu, tensor in pieces:
            groups.setdefault(name, []).append((dim, rank, glu, tensor))
    full = {}
    for name, items in groups.items():
        dim, glu = items[0][0], items[0][2]
        if dim is None:
            first = items[0][3]
            for _, _, _, other in items[1:]:
                if not torch.allclose(first, other, rtol=0, atol=replicated_atol):
                    raise AssertionError(f"{name}: replicated copies differ across ranks "
                                         f"(max diff {(first - other).abs().max():.3g})")
            full[name] = first
        else:
            by_rank = {}
            for _, rank, _, tensor in items:
                if rank in by_rank and not torch.allclose(by_rank[rank], tensor, rtol=0, atol=replicated_atol):
                    raise AssertionError(f"{name}: TP rank {rank}'s data-parallel replicas differ")
                by_rank[rank] = tensor
            full[name] = _join([by_rank[r] for r in sorted(by_rank)], dim, glu)
    return full


def remember_full_shapes(model, reference: dict) -> None:
    """Tell `local_pieces` which parameters are split on this rank (their shard is smaller than the full one)."""
    model._full_shapes = {reference_name(model, n): tuple(reference[reference_name(model, n)].shape)
                          for n, _ in list(model.named_parameters()) + _expert_bias_buffers(model)}
