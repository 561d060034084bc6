"""Weighted sum of reward components, each reported separately, failures contained per sample."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from megatron_r1.errors import ConfigError
from megatron_r1.rewards.registry import RewardFn, get_reward

log = logging.getLogger(__name__)


@dataclass
class RewardSpec:
    """One component as written in the config: `{name: accuracy, weight: 1.0, options: {...}}`."""

    name: str
    weight: float = 1.0
    options: dict = field(default_factory=dict)


@dataclass
class RewardResult:
    """Scores of one batch: the weighted `total` per completion, each component's raw values, failure counts."""

    total: list[float]
    components: dict[str, list[float]]
    errors: int = 0
    timeouts: int = 0


class CombinedReward:
    """Builds each component once (pools are reused across batches) and scores batches with their weighted sum.

    A component that raises is retried sample by sample; a sample that still raises (or returns a non-finite
    value) scores 0.0 for that component and counts one error with a warning. The run never crashes on it.
    """

    def __init__(self, specs: list[RewardSpec]):
        if not specs:
            raise ConfigError("rewards: at least one reward component is required")
        self.specs = [RewardSpec(**s) if isinstance(s, dict) else s for s in specs]
        self.keys = self._keys(self.specs)
        self.fns: list[RewardFn] = [get_reward(s.name, **s.options) for s in self.specs]

    @staticmethod
    def _keys(specs: list[RewardSpec]) -> list[str]:
        # The same reward twice (e.g. two accuracy modes) is logged as name, name_1, ...
        keys, seen = [], {}
        for s in specs:
            n = seen.get(s.name, 0)
            keys.append(s.name if n == 0 else f"{s.name}_{n}")
            seen[s.name] = n + 1
        return keys

    def _score(self, key: str, fn: RewardFn, completions: list[str], samples: list[dict]) -> tuple[list[float], int]:
        try:
            values = [float(v) for v in fn(completions, samples)]
            if len(values) != len(completions):
                raise ValueError(f"returned {len(values)} scores for {len(completions)} completions")
            if all(math.isfinite(v) for v in values):
                return values, 0
        except Exception as e:  # noqa: BLE001 - a user reward may raise anything; narrowed below per sample
            log.warning("reward %r failed on a batch of %d (%s: %s); rescoring sample by sample",
                        key, len(completions), type(e).__name__, e)
        values, failures = [], []
        for i, (c, s) in enumerate(zip(completions, samples)):
            try:
                (v,) = fn([c], [s])
                v = float(v)
                if not math.isfinite(v):
                    raise ValueError(f"non-finite score {v}")
            except Exception as e:  # noqa: BLE001 - contained: 0.0 for this sample, counted, logged
                failures.append(f"sample {i} (id={s.get('id', '?')}): {type(e).__name__}: {e}")
                v = 0.0
            values.append(v)
        if failures:
            # One line per batch, not per sample: a systematic bug would otherwise flood the log every step.
            log.warning("reward %r failed on %d of %d samples (scored 0.0); first: %s", key, len(failures),
                        len(completions), failures[0])
        return values, len(failures)

    def __call__(self, completions: list[str], samples: list[dict]) -> RewardResult:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
        total = [0.0] * len(completions)
        components: dict[str, list[float]] = {}
        errors = timeouts = 0
        for key, spec, fn in zip(self.keys, self.specs, self.fns):
            before_t, before_e = getattr(fn, "timeouts", 0), getattr(fn, "errors", 0)
            values, errs = self._score(key, fn, completions, samples)
            # Rewards with internal failure counters (accuracy's pool) report them as attributes.
            timeouts += getattr(fn, "timeouts", 0) - before_t
            errors += errs + getattr(fn, "errors", 0) - before_e
            components[key] = values
            total = [t + spec.weight * v for t, v in zip(total, values)]
        return RewardResult(total, components, errors, timeouts)

    def close(self) -> None:
        """Release the components' resources (worker processes)."""
        for fn in self.fns:
            close = getattr(fn, "close", None)
            if close is not None:
                close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
