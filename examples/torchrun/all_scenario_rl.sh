#!/usr/bin/env bash
# R1 stage 4: all-scenario GRPO (rule rewards + the reward model).
# Usage: bash examples/torchrun/all_scenario_rl.sh [--dry-run] [section.key=value ...]
# Env: NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT CONFIG CKPT_ROOT LOAD_DIR SAVE_DIR (see common.sh)
# One node, 8 GPUs, the Qwen2.5-1.5B-shaped model: TP 1, PP 1, DP 8 (the model fits every GPU whole). The 671B
# layout is in examples/slurm/; `megatron-r1 plan CONFIG --nodes 1` prints this config's per-GPU memory.
set -euo pipefail
EXAMPLES_DIR="${EXAMPLES_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=SCRIPTDIR/../common.sh
source "$EXAMPLES_DIR/common.sh"

LAUNCHER=torchrun
CONFIG="${CONFIG:-$EXAMPLES_DIR/configs/single_node/all_scenario_rl.yaml}"
LOAD_DIR="${LOAD_DIR:-$CKPT_ROOT/single_node/stage3_sft}"
SAVE_DIR="${SAVE_DIR:-$CKPT_ROOT/single_node/r1}"
STAGE_OVERRIDES=("checkpoint.load=$LOAD_DIR" "checkpoint.save=$SAVE_DIR")
r1_main train "$CONFIG" "$@"
