"""Builds and wraps the CUDA C++ kernels in csrc/ as a JIT torch extension.

Nothing is compiled at import: `load()` builds (once per source version, cached on disk) when asked, and the
dispatcher asks only when a CUDA tensor meets these ops. The sources are looked up in the repository's csrc/
and, for an installed package, in megatron_r1/csrc/ (shipped as package data).
"""
import hashlib
import os
import warnings
from pathlib import Path

import torch

from megatron_r1.jit_ext import cache_root, csrc_dir, ninja_on_path, patched_environ

from .chunked import _zeros_like_or
from .loss import KL_ESTIMATORS

EXT_NAME = "megatron_r1_grpo_ops"
SOURCES = ("grpo_ops.cpp", "grpo_ops_kernels.cu")

_module = None
_build_error = None


def source_dir() -> Path:
    """The first directory holding every csrc/ source: the repository checkout, then the installed package."""
    return csrc_dir(SOURCES)


def _cache_dir(src: Path) -> Path:
    root = cache_root()
    digest = hashlib.sha1(torch.__version__.encode())
    for s in SOURCES:
        digest.update((src / s).read_bytes())
    return root / f"{EXT_NAME}_{digest.hexdigest()[:12]}"


def build_env() -> dict:
    """Environment additions a build needs: CUDA_HOME, an arch list without a GPU, the pip CUDA headers.

    torch's CUDA wheels ship cusparse.h / cublas_v2.h (included by ATen/cuda/CUDAContext.h) under
    site-packages/nvidia/cu13/include, while a bare nvcc install may lack them.
    """
    env = {}
    if not os.environ.get("CUDA_HOME") and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"  # Hopper; without a GPU torch would otherwise build every arch
    site = Path(torch.__file__).resolve().parents[1]
    includes = [str(p) for p in sorted((site / "nvidia").glob("cu*/include")) if p.is_dir()]
    if includes:
        env["CPATH"] = os.pathsep.join(includes + [p for p in os.environ.get("CPATH", "").split(os.pathsep) if p])
    env.setdefault("MAX_JOBS", os.environ.get("MAX_JOBS", "2"))
    return env


def load(verbose: bool = False, build_dir=None):
    """Compile (if needed) and import the extension; returns the module. Raises if the build fails."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    src = source_dir()
    out = Path(build_dir) if build_dir is not None else _cache_dir(src)
    out.mkdir(parents=True, exist_ok=True)
    env = build_env()
    with patched_environ(env), ninja_on_path():
        home = os.environ.get("CUDA_HOME")
        if home and cpp_extension.CUDA_HOME != home:
            # cpp_extension resolves CUDA_HOME once, at import, from `which nvcc`; a wrapper script such as
            # /usr/local/bin/nvcc makes that /usr/local, where there is no libcudart to link against
            cpp_extension.CUDA_HOME = home
        _module = cpp_extension.load(
            name=EXT_NAME, sources=[str(src / s) for s in SOURCES], build_directory=str(out),
            extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-lineinfo"], verbose=verbose)
    return _module


def available(build: bool = True) -> bool:
    """Whether the CUDA backend can run here: a GPU, and the extension loaded (built now when `build`)."""
    global _build_error
    if not torch.cuda.is_available():
        return False
    if _module is not None:
        return True
    if not build or _build_error is not None:
        return False
    try:
        load()
    except (OSError, RuntimeError, ImportError) as e:
        # cpp_extension raises RuntimeError on compiler/linker errors, OSError on a missing toolchain
        _build_error = e

        warnings.warn(f"megatron_r1 CUDA ops unavailable, falling back to Triton: {e}", RuntimeWarning)
        return False
    return True


def build_error():
    """The exception from the last failed automatic build, or None."""
    return _build_error


class CudaRows:
    """Row primitives for chunked.py backed by csrc/'s lse kernels; the logits chunk is only read."""

    name = "cuda"
    stats_clobbers_input = False

    def __init__(self, module=None):
        self.ext = module or load()

    def stats_(self, x, tokens, vocab_start, inv_temp, want_ent):
        x = x if x.stride(1) == 1 else x.contiguous()
        lse, tgt, ez = self.ext.lse_forward(x, tokens.long(), int(vocab_start), float(inv_temp), bool(want_ent))
        local = tokens.long() - vocab_start
        return lse, tgt, (local >= 0) & (local < x.shape[1]), (ez if want_ent else None), None

    def grad_after_stats_(self, x, state, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent):
        return self.grad_from_logits(x, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent, x)

    def grad_from_logits(self, x, tokens, vocab_start, inv_temp, lse, ent, g_lp, g_ent, out):
        x = x if x.stride(1) == 1 else x.contiguous()
        has_ent = g_ent is not None
        self.ext.lse_backward(
            x, out, tokens.long(), lse.float().contiguous(), ent.float().contiguous() if has_ent else None,
            _zeros_like_or(g_lp, lse), g_ent.float().contiguous() if has_ent else None, int(vocab_start),
            float(inv_temp))
        return out


def group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """CUDA group advantages with the population std (÷G); reference.group_advantages(..., std="population")."""
    if scale not in ("std", "none"):
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return load().group_advantages(rewards, int(group_size), scale == "std", float(eps))


class _PolicyLossTokens(torch.autograd.Function):
    """Σ of per-token weighted losses from the kernel; its gradient was computed alongside in forward."""

    @staticmethod
    def forward(ctx, logp, old, adv, mask, weight, ref, tis, clip_low, clip_high, kl_coef, kl_est):
        loss, ratio, kl, grad = load().policy_loss_forward(logp, old, adv, mask, weight, ref, tis, clip_low,
                                                           clip_high, kl_coef, kl_est)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ratio, kl)
        return loss.sum(), ratio, kl

    @staticmethod
    def backward(ctx, g, _g_ratio, _g_kl):
        (grad,) = ctx.saved_tensors
        return (grad * g,) + (None,) * 10


def policy_loss_terms(logp, old, adv, mask, weight, ref, tis, cfg):
    """Token-level loss sum, ratio and KL over flat [N] fp32 inputs (see reference.grpo_policy_loss)."""
    return _PolicyLossTokens.apply(
        logp.float().contiguous(), old.float().contiguous(), adv.float().contiguous(), mask.bool().contiguous(),
        weight.float().contiguous(), None if ref is None else ref.float().contiguous(),
        None if tis is None else tis.float().contiguous(), float(cfg.clip_low), float(cfg.clip_high),
        float(cfg.kl_coef), KL_ESTIMATORS.index(cfg.kl_estimator) + 1)
