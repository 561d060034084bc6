"""Templates: r1_zero verbatim, chat turn opened with <think>, prompts with braces untouched."""
import pytest

from megatron_r1.data import get_template
from megatron_r1.errors import ConfigError

# Copied by hand from the R1 report, independently of the module's constant.
EXPECTED_R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
    "assistant first thinks about the reasoning process in the mind and then provides the user with the answer. "
    "The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, "
    "respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. User: 12+7. "
    "Assistant:"
)


def test_r1_zero_is_verbatim():
    assert get_template("r1_zero").format("12+7") == EXPECTED_R1_ZERO


def test_r1_chat_opens_the_assistant_turn_with_think():
    text = get_template("r1_chat").format("Why?")
    assert text.endswith("<think>\n") and "Why?" in text and text.index("Why?") < text.index("<think>")
    assert get_template("r1_chat").think_only and not get_template("r1_zero").think_only


def test_plain_and_custom_and_braces():
    assert get_template("plain").format("\\frac{1}{2} {x}") == "\\frac{1}{2} {x}"
    assert get_template("Q: {prompt}\nA:").format("{0}") == "Q: {0}\nA:"


def test_unknown_template():
    with pytest.raises(ConfigError, match="unknown template 'r1'"):
        get_template("r1")


def test_config_accepts_custom_text_and_chat():
    from megatron_r1.config import config_from_dict

    assert config_from_dict({"data": {"template": "Q: {prompt}\nA:"}}).data.template == "Q: {prompt}\nA:"
    assert config_from_dict({}, ["data.template=chat"]).data.template == "chat"
    with pytest.raises(ConfigError, match="data.template: unknown template 'nope'"):
        config_from_dict({"data": {"template": "nope"}})
