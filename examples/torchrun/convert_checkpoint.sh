#!/usr/bin/env bash
# Checkpoint conversion: HF safetensors -> Megatron distributed checkpoint, saved in the training layout.
# Usage: bash examples/torchrun/convert_checkpoint.sh [--dry-run] [section.key=value ...]
# Env: HF_DIR MCORE_DIR MODEL TP PP EP; NNODES/GPUS_PER_NODE: the world size the layout is checked for.
# One process: conversion streams tensors shard by shard and needs no GPU. The dry run checks the target
# layout against the config of the first stage that loads it (a typo in TP/PP/EP fails here, not at load).
# Megatron distributed checkpoints reshard on load, so later layouts may differ.
set -euo pipefail
EXAMPLES_DIR="${EXAMPLES_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=SCRIPTDIR/../common.sh
source "$EXAMPLES_DIR/common.sh"

LAUNCHER=torchrun
CONFIG="${CONFIG:-$EXAMPLES_DIR/configs/single_node/r1_zero_rl.yaml}"
MODEL="${MODEL:-qwen2}"
TP="${TP:-1}"
PP="${PP:-1}"
EP="${EP:-1}"
HF_DIR="${HF_DIR:-$CKPT_ROOT/qwen2.5_1.5b_hf}"
MCORE_DIR="${MCORE_DIR:-$CKPT_ROOT/qwen2.5_1.5b_mcore}"
STAGE_OVERRIDES=()
r1_main_single "$CONFIG" convert --source hf --target mcore --load "$HF_DIR" --save "$MCORE_DIR" \
    --model "$MODEL" --tp "$TP" --pp "$PP" --ep "$EP" -- \
    "parallel.tensor_model_parallel_size=$TP" "parallel.pipeline_model_parallel_size=$PP" \
    "parallel.expert_model_parallel_size=$EP" "$@"
