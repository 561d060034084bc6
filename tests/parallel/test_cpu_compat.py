"""Each CPU bridge in megatron_r1/parallel/cpu_compat.py is still needed and still right.

"Needed" is shown against Megatron-Core's own code: either its source still names the GPU where the bridge says it
does, or a pristine copy of the module (loaded from the same file, without our patches) fails on CPU. When an
upgrade removes the CUDA assumption these tests fail, and the bridge should go. "Right" is shown by running the
bridged path. The numbers are those of cpu_compat.py / docs/mcore_cpu.md.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys

import pytest
import torch

from megatron_r1.parallel import cpu_compat
from tests.distributed import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the bridges are installed only without CUDA")

CUDA_LITERAL = re.compile(
    r"device\s*=\s*['\"]cuda['\"]|torch\.cuda\.(current_device|synchronize|Stream|Event|current_stream|stream)\b"
    r"|\.cuda\(\)|torch\.cuda\.FloatTensor"
)


@pytest.fixture(scope="module", autouse=True)
def installed():
    assert cpu_compat.install() is True
    return True


def pristine(module_name: str):
    """A fresh copy of a Megatron module from its file, without any of our patches (its own globals)."""
    original = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(module_name + "__pristine", original.__file__)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = original.__package__
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


# ------------------------------------------------------------------ (3, 4, 5, 11-16, 18) CUDA literals
@pytest.mark.parametrize("name", sorted(set(cpu_compat.CUDA_LITERAL_MODULES)))
def test_cuda_literal_module_still_names_the_gpu_and_sees_the_cpu_shim(name):
    module = importlib.import_module(name)
    source = inspect.getsource(module)
    assert CUDA_LITERAL.search(source), f"{name} no longer names the GPU: remove it from CUDA_LITERAL_MODULES"
    assert isinstance(module.torch, cpu_compat._TorchOnCpu), f"{name} is not bridged"


def test_cpu_shim_answers_for_the_gpu():
    shim = cpu_compat._TorchOnCpu()
    assert shim.zeros(3, device="cuda").device.type == "cpu"
    assert shim.tensor([1.0], device=torch.device("cuda")).device.type == "cpu"
    assert shim.empty(2, device=shim.cuda.current_device()).device.type == "cpu"
    stream = shim.cuda.Stream()
    stream.record_event().synchronize()
    with shim.cuda.stream(stream):
        pass
    assert shim.float32 is torch.float32 and shim.nn is torch.nn  # everything else is torch itself


# ------------------------------------------------------------------ (1) global memory buffer
def test_global_memory_buffer_needs_the_bridge_and_allocates_on_cpu():
    from megatron.core import utils

    pristine_utils = pristine("megatron.core.utils")
    with pytest.raises((RuntimeError, AssertionError)):
        pristine_utils.GlobalMemoryBuffer().get_tensor((2, 3), torch.float32, "probe")
    buf = utils.GlobalMemoryBuffer()
    t = buf.get_tensor((2, 3), torch.float32, "probe")
    assert t.device.type == "cpu" and t.shape == (2, 3)
    assert buf.get_tensor((6,), torch.float32, "probe").data_ptr() == t.data_ptr()  # reused, like Megatron's


# ------------------------------------------------------------------ (2, 10) RNG tracker
def test_cuda_rng_tracker_fails_on_cpu_and_ours_forks_per_stream():
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as tp_random

    with pytest.raises((RuntimeError, AssertionError)):
        tp_random.CudaRNGStatesTracker().add("probe", 1)
    assert tensor_parallel.get_cuda_rng_tracker() is cpu_compat.get_cpu_rng_tracker()
    # (10) modules that bound the getter by name at import see ours too.
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    assert layers.get_cuda_rng_tracker is cpu_compat.get_cpu_rng_tracker

    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("a", 10)
    tracker.add("b", 20)
    torch.manual_seed(0)
    with tracker.fork("a"):
        a1 = torch.rand(2)
    outside = torch.rand(2)
    with tracker.fork("a"):
        a2 = torch.rand(2)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(2), outside), "fork must not consume the default stream"
    torch.manual_seed(10)
    ref = torch.rand(4)
    assert torch.equal(torch.cat([a1, a2]), ref), "a stream continues where it left off"
    states = tracker.get_states()
    with tracker.fork("b"):
        b1 = torch.rand(2)
    tracker.set_states(states)
    with tracker.fork("b"):
        assert torch.equal(torch.rand(2), b1), "set_states restores a stream (checkpoint resume)"
    with pytest.raises(RuntimeError):
        tracker.add("c", 10)  # same seed twice, as Megatron refuses


# ------------------------------------------------------------------ (6) Transformer Engine flags
def test_te_mock_import_is_why_the_flags_are_reset():
    if cpu_compat.te_available():
        pytest.skip("Transformer Engine is installed here: the flags are true for real")
    importlib.import_module("megatron.core.extensions.transformer_engine")  # imports without TE (mocks) ...
    assert "HAVE_TE" in inspect.getsource(importlib.import_module("megatron.core.transformer.multi_latent_attention"))
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    assert mla.HAVE_TE is False and getattr(moe_utils, "HAVE_TE", False) is False  # ... so we set them false
    assert hasattr(moe_utils, "te_general_gemm")
    assert "te_general_gemm(" in inspect.getsource(moe_utils)  # the router gating GEMM calls it when set


# ------------------------------------------------------------------ (14, 17) grad clipping, (15) L2 norm
def test_grad_clipping_and_norm_need_the_bridge_and_work_on_cpu():
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    with pytest.raises(AssertionError):
        pristine("megatron.core.optimizer.clip_grads").clip_grad_by_total_norm_fp32([p], 1.0, 5.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=10.0, total_norm=1.0)  # below the limit: untouched
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8, 0.0]), rtol=1e-5, atol=1e-6)

    grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    with pytest.raises((RuntimeError, AssertionError)):
        pristine("megatron.core.utils").local_multi_tensor_l2_norm(1, None, [grads], False)
    norm, _ = clip_grads.l2_norm_impl(1, None, [grads], False)
    assert norm.device.type == "cpu" and abs(float(norm) - 13.0) < 1e-5


# ------------------------------------------------------------------ (16) dist_checkpointing writer
def test_dist_checkpointing_writer_needs_the_bridge():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    raw = pristine("megatron.core.dist_checkpointing.strategies.filesystem_async")
    with pytest.raises((RuntimeError, AssertionError)):
        raw.FileSystemWriterAsync.preload_tensors([], non_blocking=True)
    assert filesystem_async.FileSystemWriterAsync.preload_tensors([], non_blocking=True) == []


# ------------------------------------------------------------------ (7) gloo all-to-all split sizes
def _all_to_all(rank, world_size):
    import torch.distributed as dist

    cpu_compat.install()
    from megatron.core.tensor_parallel import mappings

    inp = torch.arange(3, dtype=torch.float32) + 10 * rank  # rank 0: [0, 1, 2], rank 1: [10, 11, 12]
    send = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])  # rows to rank 0, rows to rank 1
    recv = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])  # rows from rank 0, rows from rank 1
    raw_error = None
    try:
        dist.all_to_all_single(torch.empty(3), inp, output_split_sizes=recv, input_split_sizes=send)
    except (TypeError, RuntimeError, ValueError) as e:
        raw_error = type(e).__name__
    out = mappings.all_to_all(dist.group.WORLD, inp, recv, send)
    return raw_error, out.tolist()


@pytest.mark.slow
def test_gloo_all_to_all_rejects_tensor_splits_and_the_bridge_converts_them():
    (err0, out0), (err1, out1) = run_distributed(_all_to_all, 2)
    assert err0 and err1, "gloo accepted tensor split sizes: the all-to-all bridge (7) is no longer needed"
    assert out0 == [0.0, 10.0, 11.0] and out1 == [1.0, 2.0, 12.0]


def test_broken_transformer_engine_counts_as_absent(monkeypatch):
    """An installed TE built for another torch fails at import with something other than ImportError (an OSError
    for an undefined symbol): that must mean "no TE" with a warning, not a crash."""
    import builtins
    import sys

    from megatron_r1.parallel import cpu_compat

    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name.startswith("transformer_engine"):
            raise OSError("libtransformer_engine.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(cpu_compat, "_WARNED_BROKEN_TE", False)
    with pytest.warns(RuntimeWarning, match="undefined symbol"):
        assert cpu_compat.te_available() is False


# ------------------------------------------------------------------ (19) tied embeddings across pipeline stages
def _tied_pp2(rank, world_size):
    from megatron_r1.config import ParallelConfig
    from megatron_r1.models import build_model, get_preset
    from megatron_r1.parallel import init_parallel

    layout = ParallelConfig(pipeline_model_parallel_size=2)
    init_parallel(layout)
    torch.manual_seed(rank)  # the stages draw different weights: only the setup's all-reduce makes them equal
    cfg = get_preset("llama_tiny")
    assert not cfg.untie_embeddings_and_output_weights
    model = build_model(cfg, layout, "fp32")
    return model.shared_embedding_or_output_weight().detach().clone()


@pytest.mark.slow
def test_tied_embedding_setup_needs_the_bridge_and_copies_the_first_stage():
    raw = pristine("megatron.core.models.common.language_module.language_module")
    source = inspect.getsource(raw.LanguageModule.setup_embeddings_and_output_layer)
    assert ".data.cuda()" in source, "the tied-embedding setup no longer moves to the GPU: remove bridge (19)"
    first, last = run_distributed(_tied_pp2, 2)
    assert first.abs().sum() > 0 and torch.equal(first, last)  # the last stage's output layer = the embedding
