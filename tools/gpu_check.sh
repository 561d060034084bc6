#!/usr/bin/env bash
# The device check in one command: install the carried wheels and this repository (no network), then run
# tools/gpu_check.py within a time budget, results under $OUT. docs/gpu.md says how to call it.
#
#   bash tools/gpu_check.sh fetch           here (network): download tools/gpu_wheels.txt into .whl/
#   bash tools/gpu_check.sh [ARGS...]       on the GPU machine; ARGS go to tools/gpu_check.py (e.g. --sections ops)
#
# Environment:
#   OUT                  results: gpu_check.json, gpu_check.md, gpu_check.log, install.log, env.txt
#                        (the device tool sets it; default ./gpu_check_out)
#   GPU_CHECK_DRY_RUN=1  pass --dry-run (the same code on the CPU); a missing wheel folder is then skipped
#   GPU_CHECK_WHEELS     the carried wheel folder (default .whl)
#   GPU_CHECK_SITE       where wheels and repository are installed (default /tmp/gpu_check_site)
#   GPU_CHECK_TIMEOUT    seconds the check may run in all (default 540: a device call stops at 600)
#   GPU_CHECK_BUDGET     sections not started by then are skipped (default GPU_CHECK_TIMEOUT - 90)
#   PYTHON               the interpreter (default python3: on the device, the one that holds torch)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WHEELS="${GPU_CHECK_WHEELS:-.whl}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
TIMEOUT="${GPU_CHECK_TIMEOUT:-540}"
BUDGET="${GPU_CHECK_BUDGET:-$((TIMEOUT - 90))}"
DRY="${GPU_CHECK_DRY_RUN:-0}"

if [[ "${1:-}" == "fetch" ]]; then
    # The device's interpreter and platform, not this machine's; --no-deps because the list is already closed
    # over what the image lacks (tools/gpu_wheels.txt says what is left out and why).
    mkdir -p "$WHEELS"
    exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$WHEELS" -r tools/gpu_wheels.txt
fi

OUT="${OUT:-$ROOT/gpu_check_out}"
mkdir -p "$OUT" "$SITE"
log() { echo "[gpu_check.sh] $*" >&2; }

# 1. The carried wheels, into their own folder that PYTHONPATH puts before the image's site-packages (so our
#    pins win where the image has another version); --no-index: nothing is fetched.
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
    log "installing ${#wheels[@]} wheels from $WHEELS into $SITE"
    "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" >>"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log" >&2; exit 2; }
elif [[ "$DRY" == 1 ]]; then
    log "no wheels in $WHEELS: skipped (dry run uses this machine's packages)"
else
    log "no wheels in $WHEELS: run 'bash tools/gpu_check.sh fetch' here and name $WHEELS in the run's carry"
    exit 2
fi

# 2. This repository, without its dependencies (torch is the image's; the rest came as wheels) and without
#    build isolation (that would need the network). Installed as a user would; the check itself runs from the
#    tree, which PYTHONPATH puts first, so subprocesses (the gpu-marked tests) see the same code.
log "installing the repository into $SITE"
"$PYTHON" -m pip install --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
    --target "$SITE" . >>"$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log" >&2; exit 2; }
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# 3. What ran where: versions of what the check depends on, and the GPU.
{
    date -u
    "$PYTHON" - <<'EOF'
import importlib.metadata as md
import sys

import torch

print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ("megatron-core", "megatron-r1", "transformers", "tokenizers", "numpy", "triton", "math-verify",
             "fastapi", "transformer-engine", "flash-attn", "nvidia-nccl-cu13", "liger-kernel"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "absent")
EOF
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    fi
} >"$OUT/env.txt" 2>&1 || log "environment report incomplete (see $OUT/env.txt)"
cat "$OUT/env.txt" >&2

# 4. The check, stopped at TIMEOUT; gpu_check.py writes its JSON after every section, so what it measured before
#    a stop comes back anyway.
args=(--json "$OUT/gpu_check.json" --markdown "$OUT/gpu_check.md" --budget-s "$BUDGET")
if [[ "$DRY" == 1 ]]; then
    args=(--dry-run "${args[@]}")
fi
log "running tools/gpu_check.py ${args[*]} $* (stopped after ${TIMEOUT} s)"
set +e
timeout --kill-after=15 "$TIMEOUT" "$PYTHON" tools/gpu_check.py "${args[@]}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
set -e
if ((rc == 124 || rc == 137)); then
    log "stopped after ${TIMEOUT} s; the sections finished by then are in $OUT/gpu_check.json"
fi
exit "$rc"
