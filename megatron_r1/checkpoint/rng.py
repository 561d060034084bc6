"""Per-rank random state, captured into and restored from a checkpoint, so a resumed run draws the same numbers.

Each rank has its own streams (Megatron seeds the tensor-parallel stream per TP rank, experts per EP rank), so the
states are saved per global rank as a ShardedObject and each rank reads its own back. A checkpoint loaded at a
different world size cannot give every rank "its" state: then the RNG is left as seeded (a resharded run is a new
run, not a bit-exact continuation).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from megatron_r1.parallel import cpu_compat

RNG_KEY = "rng_state"


def capture() -> dict:
    """This rank's generators: torch CPU (+ CUDA), Python, NumPy and Megatron's model-parallel tracker streams."""
    from megatron.core import tensor_parallel

    cpu_compat.install()  # on CPU the tracker is ours; must be in place before asking for it
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    from megatron.core import tensor_parallel

    cpu_compat.install()
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])


def sharded(rank: int, world_size: int, data=None):
    """The ShardedObject holding `rank`'s state among `world_size` (data None: a template to load into)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(RNG_KEY, data, (world_size,), (rank,), replica_id=0)
