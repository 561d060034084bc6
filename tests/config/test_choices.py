"""Each choice is written once (megatron_r1/choices.py) and every config field says what it is where it is defined."""
import ast
import dataclasses
import typing

import pytest

from megatron_r1 import choices
from megatron_r1 import config as C
from megatron_r1.errors import ConfigError


def _sections():
    yield C.Config
    hints = typing.get_type_hints(C.Config)
    for f in dataclasses.fields(C.Config):
        tp = hints[f.name]
        tp = (typing.get_args(tp) or (tp,))[0] if typing.get_origin(tp) is list else tp
        if dataclasses.is_dataclass(tp):
            yield tp


def test_every_field_is_documented_at_its_definition():
    # A field is documented by a comment on its line or on the line(s) right above it.
    lines = open(C.__file__).read().splitlines()
    tree = ast.parse("\n".join(lines))
    names = {cls.__name__ for cls in _sections()}
    bare = []
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name in names):
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign):
                own = lines[stmt.lineno - 1]
                above = lines[stmt.lineno - 2].strip()
                if "#" not in own and not above.startswith("#"):
                    bare.append(f"{node.name}.{stmt.target.id}")
    assert bare == [], f"config fields without a comment at their definition: {bare}"


def test_choice_fields_are_typed_with_their_names():
    # every enum-like field's type is a Literal from choices.py, and each of those has an error noun
    typed = {}
    for cls in _sections():
        for name, tp in typing.get_type_hints(cls).items():
            if typing.get_origin(tp) is typing.Literal:
                typed[f"{cls.__name__}.{name}"] = tp
    assert len(typed) >= 15, typed
    assert all(tp in choices.NOUNS for tp in typed.values())


def test_list_fields_are_typed():
    hints = typing.get_type_hints(C.Config)
    assert hints["rewards"] == list[C.RewardConfig]
    cfg = C.config_from_dict({"rewards": [{"name": "format", "weight": 2}]})
    assert cfg.rewards == [C.RewardConfig("format", 2.0)]
    with pytest.raises(ConfigError, match=r"rewards\[0\].wieght: unknown field"):
        C.config_from_dict({"rewards": [{"name": "format", "wieght": 2}]})


def test_templates_implement_the_builtin_names():
    from megatron_r1.data.templates import TEMPLATES

    assert set(TEMPLATES) | {"chat"} == set(typing.get_args(choices.BuiltinTemplate))


def test_loss_choices_are_the_config_choices():
    from megatron_r1.ops import loss

    assert loss.KL_ESTIMATORS == ("k1", "k2", "k3")  # their order numbers them in the CUDA kernel
    assert loss.LOSS_AGGS == typing.get_args(choices.LossAgg)
    assert loss.TIS_LEVELS == typing.get_args(choices.TISLevel)


@pytest.mark.parametrize("override,needle", [
    ("rl.loss_agg=token_mean", "rl.loss_agg: unknown aggregation 'token_mean' (choose from seq-mean-token-mean"),
    ("training.precision=fp16", "training.precision: unknown precision 'fp16' (choose from auto, fp32, bf16)"),
    ("model.moe_router_score_function=relu", "model.moe_router_score_function: unknown score function 'relu'"),
    ("rl.kl_estimator=4", "rl.kl_estimator: expected one of k1, k2, k3, got 4"),
])
def test_a_wrong_choice_names_the_field_and_the_choices(override, needle):
    with pytest.raises(ConfigError) as e:
        C.load_config(None, [override])
    assert needle in str(e.value)


def test_configs_built_in_code_are_checked_too():
    cfg = C.Config(rl=C.RLConfig(tis_level="answer"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="rl.tis_level: unknown level 'answer'"):
        C.validate(cfg)
