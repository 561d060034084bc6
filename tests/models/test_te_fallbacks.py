"""Transformer Engine present, absent, broken or mismatched: which spec runs and what the user is told.

Nothing here needs TE: its imports are replaced (monkeypatched `__import__`), and "a GPU is present" is
`torch.cuda.is_available` patched, so the choices a TE machine makes are checked on the CPU."""
import builtins
import sys
import warnings

import pytest
import torch

from megatron_r1.errors import ConfigError
from megatron_r1.parallel import cpu_compat
from tests.rl.common import grpo_config


def _fake_te(monkeypatch, top=None, torch_part=None):
    """`import transformer_engine` raises `top` (None: imports as an empty module); `import
    transformer_engine.pytorch` raises `torch_part` (None: imports)."""
    import types

    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "transformer_engine" or name.startswith("transformer_engine."):
            if top is not None:
                raise top
            if name.startswith("transformer_engine.pytorch") and torch_part is not None:
                raise torch_part
            if name not in sys.modules:
                monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # removed again at teardown
            return sys.modules["transformer_engine" if name == "transformer_engine" else name]
        return real_import(name, *args, **kwargs)

    for mod in [m for m in sys.modules if m.startswith("transformer_engine")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.setattr(cpu_compat, "_WARNED_BROKEN_TE", False)


def _not_installed():
    e = ModuleNotFoundError("No module named 'transformer_engine'")
    e.name = "transformer_engine"
    return e


def test_not_installed_is_absent_without_a_warning(monkeypatch):
    _fake_te(monkeypatch, top=_not_installed())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_compat.te_available() is False


@pytest.mark.parametrize("top,torch_part,shown", [
    # built for another torch: the extension's undefined symbol surfaces as an ImportError
    (None, ImportError("transformer_engine_torch.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"),
     "undefined symbol"),
    # the core wheel without the PyTorch part (transformer-engine[core-cu13] without [pytorch])
    (None, ModuleNotFoundError("No module named 'transformer_engine_torch'"), "transformer_engine_torch"),
    # a flash-attn built for another torch, which TE imports at its own import
    (None, ImportError("flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so: undefined symbol: _ZNK3c10"),
     "flash_attn_2_cuda"),
    # TE's own version check against the installed torch
    (None, RuntimeError("Transformer Engine 2.20.2 was built against torch 2.15"), "built against torch"),
    # the core library itself does not load
    (OSError("libtransformer_engine.so: cannot open shared object file"), None, "libtransformer_engine"),
    # a dependency of TE's top-level package is missing
    (type("E", (ModuleNotFoundError,), {})("No module named 'pydantic'"), None, "pydantic"),
])
def test_broken_or_mismatched_install_is_absent_with_one_warning(monkeypatch, top, torch_part, shown):
    _fake_te(monkeypatch, top=top, torch_part=torch_part)
    with pytest.warns(RuntimeWarning, match=shown) as record:
        assert cpu_compat.te_available() is False
        assert cpu_compat.te_available() is False  # asked again: no second warning
    assert len([w for w in record if "Transformer Engine is installed but" in str(w.message)]) == 1
    assert "[gpu] extra" in str(record[0].message)


def test_a_working_install_is_available(monkeypatch):
    _fake_te(monkeypatch)
    assert cpu_compat.te_available() is True


def _tiny_model_cfg(tmp_path, impl):
    return grpo_config(tmp_path, [f"model.transformer_impl={impl}", "rl.shared_prefix=true"])


def test_auto_picks_te_only_with_te_and_a_gpu_and_falls_back_otherwise(monkeypatch, tmp_path):
    from megatron_r1.models.builder import resolve_transformer_impl

    cfg = _tiny_model_cfg(tmp_path, "auto")
    for te, gpu, want in ((True, True, "transformer_engine"), (True, False, "local"), (False, True, "local")):
        monkeypatch.setattr(cpu_compat, "te_available", lambda te=te: te)
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        assert resolve_transformer_impl(cfg.model) == want, (te, gpu)
    monkeypatch.setattr(cpu_compat, "te_available", lambda: False)
    with pytest.raises(ConfigError, match="transformer_impl=transformer_engine: Transformer Engine does not import"):
        resolve_transformer_impl(_tiny_model_cfg(tmp_path, "transformer_engine").model)


def test_a_broken_te_on_a_gpu_machine_trains_with_the_local_spec(monkeypatch, tmp_path):
    """The whole chain: a mismatched TE, a GPU present, auto -> one warning and the local spec, no crash."""
    from megatron_r1.models.builder import resolve_transformer_impl

    _fake_te(monkeypatch, torch_part=ImportError("undefined symbol: _ZN2at4_ops"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.warns(RuntimeWarning, match="using the local"):
        assert resolve_transformer_impl(_tiny_model_cfg(tmp_path, "auto").model) == "local"


def test_shared_prefix_refuses_te_attention_and_says_why_and_the_cost(monkeypatch, tmp_path):
    from megatron_r1.rl.trainer import check_shared_prefix

    monkeypatch.setattr(cpu_compat, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = _tiny_model_cfg(tmp_path, "auto")  # G=4, prompts <= 16, answers <= 8 tokens
    with pytest.raises(ConfigError) as err:
        check_shared_prefix(cfg, 1)
    msg = str(err.value)
    assert msg.startswith("rl.shared_prefix:")
    for part in ("attn_mask_type=causal", "ignores the mask", "unfused", "rl.shared_prefix=false",
                 "4x(16+8) = 96 tokens per group", "16+4x8 = 48", "x2.00", "te_standin"):
        assert part in msg, part
    # te_standin (TE's layout, our block attention) and local run shared_prefix on the same machine
    for impl in ("te_standin", "local"):
        check_shared_prefix(_tiny_model_cfg(tmp_path, impl), 1)


def test_megatron_te_spec_builds_causal_attention(tmp_path):
    """The refusal's reason, checked where it lives: Megatron's TE spec (built here through the stand-in, which
    swaps only the leaf classes) gives self-attention attn_mask_type=causal, the type TE takes no mask for."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_r1.models.builder import build_transformer_config
    from megatron_r1.models.te_standin import standin_layer_spec
    from megatron_r1.parallel import init_parallel

    cfg = _tiny_model_cfg(tmp_path, "te_standin")
    init_parallel(cfg.parallel)
    block, _ = standin_layer_spec(build_transformer_config(cfg.model, cfg.parallel, "fp32"))
    for layer in block.layer_specs:
        assert layer.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.causal
