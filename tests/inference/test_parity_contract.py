"""The generator's parity contract (megatron_r1/inference/parity.py) is complete and enforced.

- Every field of the installed Megatron-Core's MLATransformerConfig (TransformerConfig + ModelParallelConfig) is
  classified exactly once: a Megatron upgrade or a new model feature cannot slip past the generator unclassified.
- Every ONLY rule refuses a value outside it, by the field's name, at engine construction (through the generator).
- Every module type the builder produces, for each model family and both specs, is one the weight reader takes.
- The fields our builder sets away from Megatron's defaults are all READ or accepted by their ONLY rule.
"""
import dataclasses

import pytest

from megatron_r1.errors import ConfigError
from megatron_r1.inference import parity
from megatron_r1.inference.functional import FunctionalGPT

from .conftest import SPEC_PRESETS


def _megatron_fields() -> set[str]:
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    return {f.name for f in dataclasses.fields(MLATransformerConfig)}


def _not_forward() -> list[str]:
    return [name for group in parity.NOT_FORWARD.values() for name in group]


def test_every_megatron_config_field_is_classified_once():
    groups = [*parity.READ, *parity.ONLY, *_not_forward()]
    twice = sorted({g for g in groups if groups.count(g) > 1})
    assert twice == [], f"fields in more than one group of inference/parity.py: {twice}"
    missing = sorted(_megatron_fields() - set(groups))
    assert missing == [], (f"Megatron-Core config fields inference/parity.py does not classify: {missing}; decide "
                           "for each whether the generator reproduces it (READ), reproduces some values (ONLY) "
                           "or it cannot change the forward (NOT_FORWARD)")
    stale = sorted(set(groups) - _megatron_fields())
    assert stale == [], f"inference/parity.py names fields this Megatron-Core does not have: {stale}"


ONLY_CASES = [(name, "deepseek_v3_tiny" if rule.applies is not None and rule.applies.__name__ in ("_mla", "_moe")
               else "llama_tiny") for name, rule in parity.ONLY.items()]


@pytest.mark.parametrize("field,preset", ONLY_CASES, ids=[f for f, _ in ONLY_CASES])
def test_each_only_rule_refuses_by_name(pairs, monkeypatch, field, preset):
    rule = parity.ONLY[field]
    local, te = pairs[preset]
    assert rule.applies is None or rule.applies(local.config), f"{field}: its rule is not in force for {preset}"
    assert rule.accepts(getattr(local.config, field)), f"{field}: the preset's own value is refused"
    assert not rule.accepts(rule.refused_example), f"{field}: the rule accepts its own refused example"
    for model in (local, te):
        monkeypatch.setattr(model.config, field, rule.refused_example)
        with pytest.raises(ConfigError, match=rf"inference: {field}: set to .*implemented: "):
            FunctionalGPT(model, max_seq=16)
        monkeypatch.undo()


def _walk(model):
    """(slot, module, path) for every module the reader visits in the decoder."""
    for i, layer in enumerate(model.decoder.layers):
        where = f"decoder.layers.{i}"
        yield "layer", layer, where
        yield "self_attention", layer.self_attention, f"{where}.self_attention"
        for name in ("cross_attention", "pre_cross_attn_layernorm"):
            yield "cross_attention", getattr(layer, name), f"{where}.{name}"
        for name in ("input_layernorm", "pre_mlp_layernorm"):
            yield "norm", getattr(layer, name), f"{where}.{name}"
        for name in ("q_layernorm", "kv_layernorm"):
            if getattr(layer.self_attention, name, None) is not None:
                yield "norm", getattr(layer.self_attention, name), f"{where}.self_attention.{name}"
        mlp = layer.mlp
        if hasattr(mlp, "router"):
            yield "moe", mlp, f"{where}.mlp"
            yield "experts", mlp.experts, f"{where}.mlp.experts"
            for j, e in enumerate(mlp.experts.local_experts):
                yield "mlp", e, f"{where}.mlp.experts.local_experts.{j}"
            if getattr(mlp, "shared_experts", None) is not None:
                yield "mlp", mlp.shared_experts, f"{where}.mlp.shared_experts"
        else:
            yield "mlp", mlp, f"{where}.mlp"
    yield "norm", model.decoder.final_layernorm, "decoder.final_layernorm"


@pytest.mark.parametrize("preset", SPEC_PRESETS)
def test_every_module_the_builder_makes_is_in_the_table(pairs, preset):
    seen = set()
    for model in pairs[preset]:
        for slot, mod, where in _walk(model):
            assert type(mod).__name__ in parity.MODULES[slot], f"{where}: {type(mod).__name__} not in {slot}"
            seen.add((slot, type(mod).__name__))
        FunctionalGPT(model, max_seq=16)  # and the reader takes the whole model
    assert {s for s, _ in seen} >= {"layer", "self_attention", "norm", "mlp", "cross_attention"}


def test_a_module_type_outside_the_table_is_refused_by_path(pairs, monkeypatch):
    import torch

    local, _ = pairs["llama_tiny"]
    odd = type("GatedAttention", (torch.nn.Module,), {})
    monkeypatch.setattr(local.decoder.layers[0], "self_attention", odd())
    with pytest.raises(ConfigError, match=r"decoder\.layers\.0\.self_attention: GatedAttention is not implemented "
                                          r"\(SelfAttention and MLASelfAttention are\)"):
        FunctionalGPT(local, max_seq=16)


@pytest.mark.parametrize("preset", SPEC_PRESETS)
def test_fields_our_builder_changes_are_reproduced(pairs, preset):
    """What models/builder.py sets away from Megatron's defaults is READ or accepted by its ONLY rule: a new
    ModelConfig feature passed to Megatron lands in one of them or fails here."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    cfg = pairs[preset][0].config
    defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)
                if f.default is not dataclasses.MISSING}
    changed = [name for name, default in defaults.items()
               if hasattr(cfg, name) and getattr(cfg, name) != default and not callable(getattr(cfg, name))]
    assert changed, "expected the preset to set some fields"
    unexplained = [name for name in changed if name not in parity.READ and name not in parity.ONLY
                   and name not in _not_forward()]
    assert unexplained == []
    refused = [name for name in changed if name in parity.ONLY and not parity.ONLY[name].accepts(getattr(cfg, name))
               and (parity.ONLY[name].applies is None or parity.ONLY[name].applies(cfg))]
    assert refused == []


@pytest.mark.parametrize("field,choices", [("rope_type", "RopeType"), ("moe_router_score_function",
                                                                          "RouterScoreFunction")])
def test_every_configurable_choice_is_reproduced(field, choices):
    """The config's Literal for a model field (choices.py) offers only values the generator's rule accepts: a new
    choice added there without generator support fails here, not at a user's engine construction."""
    from typing import get_args

    from megatron_r1 import choices as C

    values = get_args(getattr(C, choices))
    assert values and all(parity.ONLY[field].accepts(v) for v in values), (field, values)
