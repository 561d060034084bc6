"""Every bridge over Megatron-Core 0.16.1's CUDA assumptions, in one place, so the same code runs on CPU + gloo.

Installed by `install()` only when CUDA is absent; on a GPU nothing here is touched. Each bridge has a test in
tests/parallel/test_cpu_compat.py that fails if a Megatron-Core upgrade makes it unnecessary or wrong. The numbers
refer to docs/mcore_cpu.md.
"""
from __future__ import annotations

import contextlib
import importlib
import operator
import sys
import types
import warnings
from functools import reduce

import torch

_INSTALLED = False


# ------------------------------------------------------------------ (2, 10) a CPU RNG tracker, honest per TP rank
class CpuRNGStatesTracker:
    """Megatron's CUDA RNG tracker, for the CPU generator: `fork(name)` swaps in that stream's state.

    Megatron keeps a separate RNG stream for tensor-parallel regions (dropout inside TP shards, weight init of
    sharded parameters) seeded differently per TP rank; this keeps that semantics with the CPU generator.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self):
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        saved = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            # Megatron raises here; modules built before seeding (tests, tools) fork the default stream instead.
            yield
            return
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_TRACKER = CpuRNGStatesTracker()


def get_cpu_rng_tracker(*args, **kwargs):
    return _TRACKER


def model_parallel_manual_seed(seed: int) -> None:
    """CPU version of `model_parallel_cuda_manual_seed`: same offsets (2718 + TP rank; experts 1024 + 100·EP rank
    + ETP rank)."""
    from megatron.core import parallel_state as ps

    torch.manual_seed(seed)
    tp_rank = ps.get_tensor_model_parallel_rank()
    ep_rank = ps.get_expert_model_parallel_rank()
    etp_rank = ps.get_expert_tensor_parallel_rank()
    _TRACKER.reset()
    _TRACKER.add("data-parallel-rng", seed)
    _TRACKER.add("model-parallel-rng", seed + 2718 + tp_rank)
    _TRACKER.add("expert-parallel-rng", seed + 1024 + 100 * ep_rank + etp_rank)


# ------------------------------------------------------------------ (3, 4) a `torch` seen by CUDA-literal modules
class _CudaOnCpu(types.SimpleNamespace):
    """What `torch.cuda` must answer inside modules that assume a GPU: the current device is the CPU."""

    @staticmethod
    def current_device():
        return torch.device("cpu")

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def is_available():
        return False

    class Stream:  # (5) the alltoall dispatcher's side stream for device-to-host copies
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, *args, **kwargs):
            pass

        def record_event(self, *args, **kwargs):
            return _CudaOnCpu.Event()

        def synchronize(self):
            pass

    class Event:
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args, **kwargs):
            pass

        def synchronize(self):
            pass

        def wait(self, *args, **kwargs):
            pass

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CudaOnCpu.Stream()

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


def _cpu_device(kwargs):
    dev = kwargs.get("device")
    if dev == "cuda" or (isinstance(dev, torch.device) and dev.type == "cuda"):
        kwargs["device"] = "cpu"
    return kwargs


class _TorchOnCpu(types.ModuleType):
    """A stand-in for the `torch` module inside one Megatron module: tensor factories given device="cuda" make CPU
    tensors and `torch.cuda` answers as above. Everything else is torch itself."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for fn in ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "empty_like", "ones_like"):
            setattr(self, fn, self._wrap(getattr(torch, fn)))

    @staticmethod
    def _wrap(fn):
        def wrapped(*args, **kwargs):
            return fn(*args, **_cpu_device(kwargs))

        wrapped.__name__ = fn.__name__
        return wrapped

    def __getattr__(self, name):
        return getattr(torch, name)


# Modules whose code names the GPU directly (3: YaRN/rotary, 4: schedules and p2p, 5: alltoall dispatcher).
CUDA_LITERAL_MODULES = (
    "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.router",  # (11) the expert-bias buffers are made on the current device
    "megatron.core.transformer.multi_token_prediction",  # (12) the MTP loss tracker
    "megatron.core.distributed.distributed_data_parallel",  # (13) DDP's communication stream
    "megatron.core.distributed.param_and_grad_buffer",  # (13) grad buffers on the current device
    "megatron.core.optimizer.optimizer",  # (14) found-inf / loss-scale tensors made with device='cuda'
    "megatron.core.optimizer.clip_grads",  # (14) the grad-norm all-reduce tensor
    "megatron.core.tensor_parallel.layers",  # (18) sequence-parallel linear backward all-gathers into current_device()
    "megatron.core.tensor_parallel.utils",  # (18) 1-D split/gather helpers allocate on current_device()
    "megatron.core.tensor_parallel.mappings",  # (18) sequence-parallel reduce-scatter output on the current device
    "megatron.core.utils",  # (15) the fallback multi-tensor L2 norm puts its result on device="cuda"
    # (16) dist_checkpointing's writer synchronises the GPU and builds its failure flag on the current device
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
)


# ------------------------------------------------------------------ (1) the global memory buffer
def _cpu_get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
    required = reduce(operator.mul, tensor_shape, 1)
    buf = self.buffer.get((name, dtype))
    if buf is None or buf.numel() < required:
        self.buffer[(name, dtype)] = buf = torch.empty(required, dtype=dtype, device="cpu", requires_grad=False)
    return buf[0:required].view(*tensor_shape)


# ------------------------------------------------------------------ (7) gloo all_to_all needs list split sizes
def _patch_all_to_all():
    from megatron.core.tensor_parallel import mappings

    original = mappings._AllToAll.forward

    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        if torch.is_tensor(output_split_sizes):
            output_split_sizes = output_split_sizes.tolist()
        if torch.is_tensor(input_split_sizes):
            input_split_sizes = input_split_sizes.tolist()
        if output_split_sizes is not None and not isinstance(output_split_sizes, list):
            output_split_sizes = list(output_split_sizes)
        if input_split_sizes is not None and not isinstance(input_split_sizes, list):
            input_split_sizes = list(input_split_sizes)
        return original(ctx, group, input, output_split_sizes, input_split_sizes)

    mappings._AllToAll.forward = staticmethod(forward)
    mappings._AllToAll._megatron_r1_cpu = True


# ------------------------------------------------------------------ (17) gradient clipping asserts CUDA grads
def cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 without its `grad.type() == 'torch.cuda.FloatTensor'` assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _patch_clip_grads():
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = cpu_clip_grad_by_total_norm_fp32


# ------------------------------------------------------------------ (19) tied embeddings across pipeline stages
@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """`Tensor.cuda()` returning the tensor itself, for the duration of one Megatron call that moves a tensor to the
    GPU only to all-reduce it (gloo reduces CPU tensors)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def _patch_tied_embedding_setup():
    """`LanguageModule.setup_embeddings_and_output_layer` copies the first stage's word embeddings into the last
    stage's output layer (tied weights, PP > 1) with `weight.data.cuda()` before the all-reduce."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_megatron_r1_cpu", False):
        return

    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    setup_embeddings_and_output_layer._megatron_r1_cpu = True  # type: ignore[attr-defined]
    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def install() -> bool:
    """Install the bridges when CUDA is absent; returns True if they are (idempotent).

    Must run before Megatron's model modules are imported (10): they bind `get_cuda_rng_tracker` at import.
    """
    global _INSTALLED
    if torch.cuda.is_available():
        return False
    if _INSTALLED:
        return True
    from megatron.core import tensor_parallel, utils
    from megatron.core.tensor_parallel import random as tp_random

    utils.GlobalMemoryBuffer.get_tensor = _cpu_get_tensor
    for mod in (tensor_parallel, tp_random):
        mod.get_cuda_rng_tracker = get_cpu_rng_tracker
        mod.model_parallel_cuda_manual_seed = lambda seed, *a, **k: model_parallel_manual_seed(seed)
    shim = _TorchOnCpu()
    for name in CUDA_LITERAL_MODULES:
        importlib.import_module(name).torch = shim
    _patch_all_to_all()
    _patch_clip_grads()
    _patch_tied_embedding_setup()
    # (6) Without Transformer Engine its extension module still imports with mock objects, so modules believe
    # TE is there; tell them the truth so they take their pure-torch paths.
    _disable_te_flags()
    # (10) Modules that imported the tracker getter by name before we ran.

    for mod_name, mod in list(sys.modules.items()):
        if mod_name.startswith("megatron.core") and getattr(mod, "get_cuda_rng_tracker", None) is not None:
            if mod is not tp_random:
                mod.get_cuda_rng_tracker = get_cpu_rng_tracker
    _INSTALLED = True
    return True


def te_available() -> bool:
    """Whether Transformer Engine imports (its PyTorch part included).

    Not installed at all (`import transformer_engine` finds no module) counts as absent, silently: the local
    spec is the documented fallback (model.transformer_impl=auto). An install that is there but broken or
    mismatched counts as absent too, with one warning naming the error, so the local spec runs instead of the
    process dying at import: a core without its PyTorch part (`pip install transformer-engine[core-cu13]`
    without `pytorch`), a library built for another torch (an ImportError or OSError for an undefined symbol),
    a flash-attn that TE imports and that was built for another torch, a version check that raises."""
    try:
        import transformer_engine  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name == "transformer_engine":
            return False  # not installed
        _warn_broken_te(e)
        return False
    except Exception as e:  # noqa: BLE001 - any failure of an optional package's import means "not usable"
        _warn_broken_te(e)
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 - as above: TE is there, its PyTorch part is not usable
        _warn_broken_te(e)
        return False
    return True


_WARNED_BROKEN_TE = False


def _warn_broken_te(error: BaseException) -> None:
    """Once per process: te_available() is asked many times."""
    global _WARNED_BROKEN_TE
    if _WARNED_BROKEN_TE:
        return
    _WARNED_BROKEN_TE = True

    warnings.warn(f"Transformer Engine is installed but does not import ({type(error).__name__}: {error}); using "
                  "the local (torch) layer spec. Reinstall the [gpu] extra built for this torch (README, GPU section).",
                  RuntimeWarning, stacklevel=3)


def _disable_te_flags():
    if te_available():
        return
    for name in ("megatron.core.transformer.multi_latent_attention", "megatron.core.transformer.moe.moe_utils"):
        mod = importlib.import_module(name)
        if getattr(mod, "HAVE_TE", False):
            mod.HAVE_TE = False
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None  # referenced by the router's gating GEMM, defined only with TE
