"""Prompt templates: how a dataset prompt becomes the text the policy continues (chosen in config)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from megatron_r1.errors import ConfigError

# Verbatim from the DeepSeek-R1 report (the R1 report, section 2.2.1); only {prompt} is substituted.
R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
# DeepSeek-R1's chat format: the assistant turn is opened with "<think>\n", so the model always starts reasoning.
R1_CHAT = "<\uff5cbegin\u2581of\u2581sentence\uff5c><\uff5cUser\uff5c>{prompt}<\uff5cAssistant\uff5c><think>\n"


@dataclass(frozen=True)
class Template:
    """A named prompt template; `format(prompt)` returns the full text given to the model."""

    name: str
    text: str
    think_only: bool = False  # True when the answer follows </think> untagged (the `format` reward's option)

    def format(self, prompt: str) -> str:
        # str.replace, not str.format: prompts contain braces (LaTeX, code) that must pass through untouched.
        return self.text.replace("{prompt}", prompt)


@dataclass(frozen=True)
class ChatTemplate(Template):
    """`chat`: the prompt as one user message through the tokenizer's own chat template (jinja, rendered by
    transformers as HF does: its default system prompt, special tokens, the opened assistant turn)."""

    tokenizer: Any = None
    system: Optional[str] = None  # a system message before the prompt (None: the template's own default)

    def messages(self, prompt: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [{"role": "user", "content": prompt}]

    def format(self, prompt: str) -> str:
        return self.tokenizer.render_chat(self.messages(prompt), add_generation_prompt=True)


TEMPLATES = {
    "r1_zero": Template("r1_zero", R1_ZERO),
    "r1_chat": Template("r1_chat", R1_CHAT, think_only=True),
    "plain": Template("plain", "{prompt}"),
}


def get_template(name: str, tokenizer=None) -> Template:
    """The template called `name` (`r1_zero`, `r1_chat`, `plain`; `chat`: `tokenizer`'s chat template), or a custom
    one given as text with `{prompt}`."""
    if name in TEMPLATES:
        return TEMPLATES[name]
    if name == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("data.template: chat needs a tokenizer with a chat template (an HF tokenizer "
                              "directory with chat_template.jinja or tokenizer_config.json's chat_template)")
        return ChatTemplate("chat", "{prompt}", tokenizer=tokenizer)
    if "{prompt}" in name:
        return Template("custom", name)
    raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}, chat (or a string containing "
                      f"'{{prompt}}')")
