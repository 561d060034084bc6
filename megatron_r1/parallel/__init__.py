"""Process groups over megatron.core.parallel_state; the CPU/gloo compatibility lives in cpu_compat."""
from megatron_r1.parallel.runtime import ParallelContext, destroy_parallel, init_parallel

__all__ = ["ParallelContext", "init_parallel", "destroy_parallel"]
