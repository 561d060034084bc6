"""Registry and CombinedReward: names, plugins, option checking, weights, per-component values, contained errors."""
import logging
import math

import pytest

from megatron_r1.errors import ConfigError
from megatron_r1.rewards import CombinedReward, RewardResult, RewardSpec, available_rewards, get_reward, register_reward


@register_reward("test_flaky")
def flaky(completions, samples, fail_on="boom"):
    """Raises for any completion containing `fail_on`: exercises error containment."""
    if any(fail_on in c for c in completions):
        raise RuntimeError("flaky reward exploded")
    return [0.25] * len(completions)


def length_plugin(completions, samples, scale=1.0):
    """A user plugin loaded by dotted name."""
    return [scale * len(c) for c in completions]


def needs_option(completions, samples, *, threshold):
    return [float(len(c) > threshold) for c in completions]


def nan_plugin(completions, samples):
    return [math.nan] * len(completions)


def test_builtins_are_registered():
    assert {"accuracy", "format", "language_consistency", "code"} <= set(available_rewards())


def test_dotted_plugin_name_and_options():
    fn = get_reward(f"{__name__}:length_plugin", scale=2.0)
    assert fn(["abc"], [{}]) == [6.0]


@pytest.mark.parametrize("name,options,message", [
    ("no_such_reward", {}, "unknown reward 'no_such_reward'"),
    ("format", {"thinkonly": True}, "unknown option"),
    ("accuracy", {"mode": "fuzzy"}, "mode must be"),
    ("tests.rewards.nope:fn", {}, "cannot import module"),
    (f"{__name__}:missing", {}, "has no attribute 'missing'"),
    (f"{__name__}:needs_option", {}, "missing required option"),
])
def test_config_errors_are_clear(name, options, message):
    with pytest.raises(ConfigError, match=message):
        get_reward(name, **options)


def test_weights_components_and_contained_errors(caplog):
    specs = [RewardSpec("format", 0.5), RewardSpec("test_flaky", 2.0), {"name": "test_flaky", "weight": 1.0,
                                                                         "options": {"fail_on": "never"}}]
    good = "<think> r </think> <answer> 5 </answer>"
    with CombinedReward(specs) as reward, caplog.at_level(logging.WARNING):
        result = reward([good, "boom"], [{"id": "a"}, {"id": "b"}])
    assert isinstance(result, RewardResult)
    assert result.components == {"format": [1.0, 0.0], "test_flaky": [0.25, 0.0], "test_flaky_1": [0.25, 0.25]}
    assert result.total == [pytest.approx(0.5 + 0.5 + 0.25), pytest.approx(0.25)]
    assert (result.errors, result.timeouts) == (1, 0)
    assert "test_flaky" in caplog.text and "id=b" in caplog.text


def test_non_finite_scores_count_as_errors():
    with CombinedReward([RewardSpec(f"{__name__}:nan_plugin")]) as reward:
        result = reward(["a", "b"], [{}, {}])
    assert result.total == [0.0, 0.0] and result.errors == 2


def test_accuracy_timeouts_are_reported():
    reward = CombinedReward([RewardSpec("accuracy", 1.0, {"timeout": 1.0, "num_workers": 1})])
    try:
        result = reward(["<answer>$(10^{10^{7}})!$</answer>", "<answer>4</answer>"],
                        [{"answer": "1/3"}, {"answer": "4"}])
    finally:
        reward.close()
    assert result.total == [0.0, 1.0] and result.timeouts == 1


def test_empty_config_is_rejected():
    with pytest.raises(ConfigError):
        CombinedReward([])
