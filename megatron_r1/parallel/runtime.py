"""Start torch.distributed and Megatron's TP/PP/EP/DP groups from a ParallelConfig; one call, any launcher.

Works under `torchrun` (RANK/WORLD_SIZE/MASTER_ADDR in the environment), in tests that already created the default
process group, and as a plain single process (world size 1, a loopback rendezvous of our own). The backend is NCCL
when CUDA is present and gloo otherwise, unless the config names one.
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1.config import ParallelConfig, validate_world_size
from megatron_r1.errors import ConfigError
from megatron_r1.parallel import cpu_compat


@dataclass
class ParallelContext:
    """Where this rank stands: sizes and ranks of each parallel dimension (read-only view of parallel_state)."""

    rank: int
    world_size: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    ep_size: int
    ep_rank: int
    dp_size: int
    dp_rank: int
    device: torch.device
    backend: str

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes logs, plots and results: the last pipeline stage of the first DP/TP group."""
        return self.tp_rank == 0 and self.dp_rank == 0 and self.is_last_stage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_backend(name: str) -> str:
    if name == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if name == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend: nccl needs CUDA GPUs; use gloo (or auto) on CPU")
    return name


def init_parallel(p: ParallelConfig, seed: int = 1234, timeout_minutes: int = 30) -> ParallelContext:
    """Initialise (or reuse) the default process group and Megatron's model-parallel groups for layout `p`."""
    from megatron.core import parallel_state as ps

    backend = choose_backend(p.backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "RANK" not in os.environ:
            # A plain single process: a loopback rendezvous of its own, without touching os.environ (child
            # processes, e.g. tests' subprocesses, must not inherit a stale RANK / MASTER_PORT).
            validate_world_size(p, 1)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
        else:
            validate_world_size(p, int(os.environ.get("WORLD_SIZE", "1")))
            dist.init_process_group(backend, timeout=timeout)
    world = dist.get_world_size()
    validate_world_size(p, world)
    cpu_compat.install()
    if ps.is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel_size or p.tensor_model_parallel_size,
        create_gloo_process_groups=True,  # the distributed optimizer and checkpointing use gloo side groups
    )
    if torch.cuda.is_available():
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(seed)
    else:
        cpu_compat.model_parallel_manual_seed(seed)
    return current_context(backend)


def current_context(backend: str | None = None) -> ParallelContext:
    from megatron.core import parallel_state as ps

    return ParallelContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
        backend=backend or dist.get_backend(),
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
