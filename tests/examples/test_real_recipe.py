"""examples/real (the SmolLM2-135M recipe) cannot rot: its configs pass `megatron-r1 train --dry-run` with the
overrides run.sh adds, its held-out problems are disjoint from what SFT and GRPO train on, and (slow) run.sh runs
end to end at a tiny size on the real weights: convert -> eval -> SFT -> eval -> GRPO -> eval -> export ->
transformers generates from the export -> summary + curve."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.config import load_config
from tests.checkpoint.hf_assets import write_tiny_tokenizer
from tests.checkpoint.smollm2 import needs_smollm2, smollm2_dirs

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "examples" / "real"


@pytest.mark.parametrize("name", ["sft", "grpo"])
def test_configs_pass_dry_run_with_run_sh_overrides(name, tmp_path, capsys):
    from megatron_r1.cli import main

    tok = write_tiny_tokenizer(tmp_path / "tok", 300)  # stands in for the converted checkpoint's own tokenizer
    rc = main(["train", str(REAL / f"{name}.yaml"), "--dry-run", f"checkpoint.load={tmp_path}/prev",
               f"checkpoint.save={tmp_path}/ckpt", f"logging.run_dir={tmp_path}/run", f"tokenizer.path={tok}"])
    out = capsys.readouterr().out
    assert rc == 0 and "config is valid" in out and f"config: stage {name}" in out, out
    assert "0.13B main model" in out  # the SmolLM2-135M shape, not a default preset


def test_held_out_problems_are_not_trained_on():
    from megatron_r1.data import load_dataset

    def prompts(name: str, split: str, **options) -> set[str]:
        data = load_config(REAL / f"{name}.yaml", ["tokenizer.path=builtin:demo", "model.vocab_size=384"]).data
        return {s["prompt"] for s in load_dataset(data.source, split=split, **{**data.options, **options})}

    held_out = prompts("eval", "test", num_samples=256)  # run.sh evaluates the first 64 (--num-problems)
    assert len(held_out) == 256  # unique problems
    trained = prompts("sft", "train") | prompts("grpo", "train")
    assert len(trained) > 300 and not held_out & trained
    cfgs = {n: load_config(REAL / f"{n}.yaml", ["tokenizer.path=builtin:demo", "model.vocab_size=384"])
            for n in ("sft", "grpo", "eval")}
    assert {c.data.template for c in cfgs.values()} == {"r1_zero"}
    assert cfgs["grpo"].data.options["difficulty"] == cfgs["eval"].data.options["difficulty"]


@needs_smollm2
@pytest.mark.slow  # the real 135M model through every stage at a tiny size: ~3 min on 2 busy cores
def test_run_sh_end_to_end_tiny(tmp_path):
    hf, mcore = smollm2_dirs()  # the converted SmolLM2 (shared with the parity test): run.sh skips its conversions
    run = tmp_path / "run"
    run.mkdir()
    (run / "hf_in").symlink_to(hf)
    (run / "base").symlink_to(mcore)
    env = dict(os.environ, PYTHON=sys.executable, K="1", NUM_PROBLEMS="2", CHECK_PROBLEMS="1",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               SFT_ARGS="data.options.num_samples=2 training.micro_batch_size=2 training.global_batch_size=2",
               GRPO_ARGS="training.train_steps=1 rl.prompts_per_step=1 rl.group_size=2 rl.mini_batch_size=2 "
                         "training.micro_batch_size=2 training.global_batch_size=2 rl.max_response_length=8",
               EVAL_ARGS="rl.max_response_length=8")
    cmd = ["bash", str(REAL / "run.sh"), str(run)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["eval"]) == {"base", "sft", "grpo"}
    assert all(e["num_problems"] == 2 and e["k"] == 1 for e in summary["eval"].values())
    assert len(summary["sft_loss"]) == 1 and len(summary["grpo_reward"]) == 1
    steps = [t["step"] for t in summary["times"]]
    assert steps == ["eval_base", "sft", "eval_sft", "grpo", "eval_grpo", "export", "check_export"]
    assert all(t["rc"] == 0 and t["cpu_s"] > 0 for t in summary["times"])
    assert (run / "curve.png").stat().st_size > 10_000
    # The export is a complete HF directory: the source's exact config.json and tokenizer, loaded by transformers.
    assert json.loads((run / "hf_out" / "config.json").read_text()) == json.loads((hf / "config.json").read_text())
    assert (run / "hf_out" / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    check = json.loads((run / "export_check.json").read_text())
    assert check["model_type"] == "llama" and check["problems"] == 1 and check["samples"][0]["completion"].strip()

    # A re-run finds every step done and only summarises again.
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count(": done (") == 9, again.stdout
