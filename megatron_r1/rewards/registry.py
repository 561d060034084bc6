"""Name -> reward function registry: built-ins, user plugins (`pkg.module:function`) and options checking."""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Callable, Protocol

from megatron_r1.errors import ConfigError
from megatron_r1.registry import Registry


class RewardFn(Protocol):
    """A batched reward: one float per completion; `samples[i]` is the dataset row that prompted `completions[i]`."""

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]: ...


# Built-ins, imported on the first lookup (they register themselves). reward_model pulls in torch/Megatron: it is
# imported only when asked for by name.
_BUILTINS = ("megatron_r1.rewards.accuracy", "megatron_r1.rewards.code", "megatron_r1.rewards.countdown",
             "megatron_r1.rewards.format", "megatron_r1.rewards.language")
_HEAVY_BUILTINS = {"reward_model": "megatron_r1.rewards.reward_model"}
REWARDS: Registry[Callable] = Registry("reward", _BUILTINS)


def register_reward(name: str):
    """Register a reward under `name`.

    The decorated object is either a function `fn(completions, samples, **options) -> list[float]` or a class
    whose `__init__(**options)` builds a batched callable (for rewards that hold state such as a process pool).
    """
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    """The registered names, for error messages and `--help`."""
    return sorted(set(REWARDS.names()) | set(_HEAVY_BUILTINS))


def _resolve(name: str):
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(f"reward {name!r}: cannot import module {module_name!r}: {e}") from e
        try:
            return getattr(module, attr)
        except AttributeError:
            raise ConfigError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}") from None
    if name not in REWARDS and name in _HEAVY_BUILTINS:
        importlib.import_module(_HEAVY_BUILTINS[name])
    if name not in REWARDS:
        raise ConfigError(f"unknown reward {name!r}; known: {', '.join(available_rewards())} "
                          f"(or use 'pkg.module:function')")
    return REWARDS.get(name)


def _check_options(name: str, target: Callable, options: dict, skip: int) -> None:
    """Fail at config time, not mid-run, when an option is misspelled."""
    params = list(inspect.signature(target).parameters.values())[skip:]
    missing = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and p.name not in options]
    if missing:
        raise ConfigError(f"reward {name!r}: missing required option(s) {', '.join(missing)}")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    allowed = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ConfigError(f"reward {name!r}: unknown option(s) {', '.join(unknown)}; "
                          f"allowed: {', '.join(sorted(allowed)) or 'none'}")


def get_reward(name: str, **options) -> RewardFn:
    """Build the batched reward `fn(completions, samples) -> list[float]` registered as `name` with `options`."""
    obj = _resolve(name)
    if inspect.isclass(obj):
        _check_options(name, obj.__init__, options, skip=1)
        return obj(**options)
    if not callable(obj):
        raise ConfigError(f"reward {name!r} resolves to {type(obj).__name__}, not a function or class")
    _check_options(name, obj, options, skip=2)
    return functools.partial(obj, **options) if options else obj
