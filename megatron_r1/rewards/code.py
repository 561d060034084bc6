"""`code` reward: the share of `sample["tests"]` passed by the program in the completion's last code block."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from megatron_r1.rewards.extract import last_code_block
from megatron_r1.rewards.registry import register_reward
from megatron_r1.rewards.sandbox import SandboxLimits, run_python, sandbox_capabilities

log = logging.getLogger(__name__)


def normalize_tests(tests) -> list[dict]:
    """Accept the common test layouts and return `[{"input": str, "output": str} | {"assert": str}, ...]`.

    Layouts: a list of `{"input", "output"}` dicts; APPS-style `{"inputs": [...], "outputs": [...]}`; a list of
    assert snippets (strings) run after the program.
    """
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise ValueError(f"tests: {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs")
        return [{"input": str(i), "output": str(o)} for i, o in zip(tests["inputs"], tests["outputs"])]
    if not isinstance(tests, list):
        raise ValueError(f"tests must be a list or an inputs/outputs dict, got {type(tests).__name__}")
    out = []
    for k, t in enumerate(tests):
        if isinstance(t, str):
            out.append({"assert": t})
        elif isinstance(t, dict) and "output" in t:
            out.append({"input": str(t.get("input", "")), "output": str(t["output"])})
        else:
            raise ValueError(f"tests[{k}]: expected an assert string or an input/output dict, got {t!r:.80}")
    return out


def _same_output(actual: str, expected: str) -> bool:
    # Judges ignore trailing whitespace on each line and trailing blank lines.
    def lines(s: str) -> list[str]:
        return [line.rstrip() for line in s.strip("\n").splitlines()]

    return lines(actual) == lines(expected)


@register_reward("code")
class CodeReward:
    """Runs the last fenced Python block of each completion against its sample's tests in the sandbox."""

    def __init__(self, tests_field: str = "tests", wall_seconds: float = 10.0, cpu_seconds: int = 5,
                 memory_mb: int = 512, max_processes: int = 64, output_bytes: int = 1 << 20, max_parallel: int = 4,
                 python: str | None = None):
        self.tests_field = tests_field
        self.limits = SandboxLimits(wall_seconds, cpu_seconds, memory_mb, max_processes, output_bytes)
        self.max_parallel = max_parallel
        self.python = python
        sandbox_capabilities(python)  # probe now, in one thread, not lazily from the scoring threads

    def _run_one(self, program: str, test: dict) -> bool:
        if "assert" in test:
            result = run_python(program + "\n\n" + test["assert"] + "\n", "", self.limits, self.python)
            return result.returncode == 0 and not result.timed_out
        result = run_python(program, test["input"], self.limits, self.python)
        return result.returncode == 0 and not result.timed_out and _same_output(result.stdout, test["output"])

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        jobs: list[tuple[int, str, dict]] = []
        totals = [0] * len(completions)
        for i, (completion, sample) in enumerate(zip(completions, samples, strict=True)):
            tests = normalize_tests(sample[self.tests_field])
            totals[i] = len(tests)
            program = last_code_block(completion)
            if program is not None:
                jobs.extend((i, program, t) for t in tests)
        passed = [0] * len(completions)
        # Threads only wait on child processes; the work happens in the sandboxes.
        with ThreadPoolExecutor(max_workers=self.max_parallel) as ex:
            for (i, _, _), ok in zip(jobs, ex.map(lambda j: self._run_one(j[1], j[2]), jobs)):
                passed[i] += ok
        return [p / t if t else 0.0 for p, t in zip(passed, totals)]
