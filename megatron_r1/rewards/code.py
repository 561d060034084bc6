"""`code` reward: the share of `sample["tests"]` passed by the program in the completion's last code block."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from megatron_r1.errors import ConfigError
from megatron_r1.rewards.extract import last_code_block
from megatron_r1.rewards.registry import register_reward
from megatron_r1.rewards.sandbox import SandboxLimits, run_python, sandbox_capabilities, unisolated_refusal

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
    """Runs the last fenced Python block of each completion against its sample's tests in the sandbox.

    Each test is one isolated run (see `sandbox.py`); `sample[files_field]` ({name: content}), when present, is
    placed next to the program. Without a working isolation mechanism construction fails unless
    `allow_unisolated=true` accepts programs that can read any world-readable file.
    """

    def __init__(self, tests_field: str = "tests", wall_seconds: float = 10.0, cpu_seconds: int = 5,
                 memory_mb: int = 512, max_processes: int = 64, output_bytes: int = 1 << 20, max_parallel: int = 4,
                 python: str | None = None, cpu_cores: float = 1.0, files_field: str = "files",
                 allow_unisolated: bool = False):
        self.tests_field = tests_field
        self.files_field = files_field
        self.limits = SandboxLimits(wall_seconds=wall_seconds, cpu_seconds=cpu_seconds, memory_mb=memory_mb,
                                    max_processes=max_processes, output_bytes=output_bytes, cpu_cores=cpu_cores)
        self.max_parallel = max_parallel
        self.python = python
        self.allow_unisolated = allow_unisolated
        caps = sandbox_capabilities(python)  # probe now, in one thread, not lazily from the scoring threads
        if caps.isolation is None and not allow_unisolated:
            raise ConfigError(f"reward 'code': {unisolated_refusal(caps)}")

    def _run(self, source: str, stdin: str, files: dict | None):
        return run_python(source, stdin, self.limits, self.python, files=files,
                          allow_unisolated=self.allow_unisolated)

    def _run_one(self, program: str, test: dict, files: dict | None) -> bool:
        if "assert" in test:
            result = self._run(program + "\n\n" + test["assert"] + "\n", "", files)
            return result.returncode == 0 and not result.timed_out
        result = self._run(program, test["input"], files)
        return result.returncode == 0 and not result.timed_out and _same_output(result.stdout, test["output"])

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        jobs: list[tuple[int, str, dict, dict | None]] = []
        totals = [0] * len(completions)
        for i, (completion, sample) in enumerate(zip(completions, samples, strict=True)):
            tests = normalize_tests(sample[self.tests_field])
            totals[i] = len(tests)
            program = last_code_block(completion)
            if program is not None:
                files = sample.get(self.files_field)
                jobs.extend((i, program, t, files) for t in tests)
        passed = [0] * len(completions)
        # Threads only wait on child processes; the work happens in the sandboxes.
        with ThreadPoolExecutor(max_workers=self.max_parallel) as ex:
            for (i, *_), ok in zip(jobs, ex.map(lambda j: self._run_one(*j[1:]), jobs)):
                passed[i] += ok
        return [p / t if t else 0.0 for p, t in zip(passed, totals)]
