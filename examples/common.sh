# shellcheck shell=bash
# Shared by every launch script in examples/torchrun and examples/slurm (sourced, never run).
#
# A script sets LAUNCHER (torchrun | slurm) and its defaults, then calls
#   r1_main <command> <config> [key=value ...] [--dry-run]
# where <command> is a `megatron-r1` sub-command (train, sample, distill) run on every GPU, or r1_main_single for
# one process (checkpoint conversion). `--dry-run` validates config and layout on the CPU (no GPU, srun or
# scontrol needed), prints the command it would run, and exits 0.
#
# Every setting below is an environment variable with a default, so `NNODES=32 CONFIG=my.yaml sbatch ...` works.

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
MASTER_PORT="${MASTER_PORT:-29500}"
PYTHON="${PYTHON:-python}"
CKPT_ROOT="${CKPT_ROOT:-checkpoints}"
DATA_ROOT="${DATA_ROOT:-data}"
GPU_MEMORY_GB="${GPU_MEMORY_GB:-80}"
STAGE_OVERRIDES=()  # set by each script (checkpoint directories); passed before the user's overrides

# ------------------------------------------------------------------------------------------------ environment
r1_export_env() {
    # Megatron overlaps TP/EP communication with compute only if kernels are queued in issue order: one
    # hardware queue per device keeps the communication kernel ahead of the GEMM it overlaps.
    export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
    # A rank that dies mid-collective must take the job down (and let SLURM requeue it), not hang the others.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    # Dump the NCCL flight recorder on a watchdog timeout: the only way to tell which rank stalled.
    export TORCH_NCCL_TRACE_BUFFER_SIZE="${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}"
    export TORCH_NCCL_DUMP_ON_TIMEOUT="${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}"
    # InfiniBand: RDMA over all HCAs, GPUDirect RDMA when the NIC and GPU share a PCIe switch. H800 nodes have
    # 8 × 400 Gb/s CX7 NICs (mlx5_*); set NCCL_IB_HCA to the site's list if it differs.
    export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"
    export NCCL_IB_HCA="${NCCL_IB_HCA:-mlx5}"
    export NCCL_IB_GID_INDEX="${NCCL_IB_GID_INDEX:-3}"  # RoCE v2; harmless on native IB
    export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"  # long retries: a congested fabric is not a dead link
    export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
    export NCCL_NET_GDR_LEVEL="${NCCL_NET_GDR_LEVEL:-PHB}"
    # Bootstrap / out-of-band traffic over the management Ethernet, not docker or loopback interfaces.
    export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker0}"
    export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}"
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # The caching allocator fragments under the engine's variable-length KV cache; expandable segments avoid it.
    export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
}

# ------------------------------------------------------------------------------------------------ arguments
# Splits "$@" into DRY_RUN (0/1) and OVERRIDES (key=value ...); anything else is a usage error.
r1_parse_args() {
    DRY_RUN=0
    OVERRIDES=()
    local arg
    for arg in "$@"; do
        case "$arg" in
            --dry-run) DRY_RUN=1 ;;
            -h | --help)
                echo "usage: $0 [--dry-run] [section.key=value ...]   (env: NNODES GPUS_PER_NODE CONFIG CKPT_ROOT ...)"
                exit 0 ;;
            *=*) OVERRIDES+=("$arg") ;;
            *)
                echo "$0: unexpected argument '$arg' (expected --dry-run or section.key=value)" >&2
                exit 2 ;;
        esac
    done
}

# ------------------------------------------------------------------------------------------------ launchers
# The distributed launch prefix for NNODES × GPUS_PER_NODE processes, in the array LAUNCH.
r1_launch_prefix() {
    local rdzv=(--nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --rdzv_backend c10d
        --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT")
    case "$LAUNCHER" in
        torchrun)
            LAUNCH=(torchrun "${rdzv[@]}" -m megatron_r1) ;;
        slurm)
            # One torchrun per node; c10d rendezvous on the first node assigns ranks, so every node runs the
            # identical command and a node restarted by SLURM can rejoin under the same job id.
            LAUNCH=(srun --nodes "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
                torchrun "${rdzv[@]}" --rdzv_id "${SLURM_JOB_ID:-r1}" -m megatron_r1) ;;
        *)
            echo "LAUNCHER must be torchrun or slurm, got '${LAUNCHER:-}'" >&2
            exit 2 ;;
    esac
}

r1_slurm_master_addr() {
    # The first node of the allocation hosts the rendezvous. scontrol expands compressed lists (node[01-64]).
    if [[ -n "${MASTER_ADDR:-}" ]]; then
        return
    fi
    if command -v scontrol >/dev/null 2>&1 && [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
    else
        MASTER_ADDR="${SLURMD_NODENAME:-localhost}"  # dry run off the cluster: a placeholder
    fi
}

r1_defaults() {
    if [[ "$LAUNCHER" == slurm ]]; then
        NNODES="${NNODES:-${SLURM_JOB_NUM_NODES:-${DEFAULT_NNODES:-1}}}"
        r1_slurm_master_addr
    else
        NNODES="${NNODES:-1}"
        MASTER_ADDR="${MASTER_ADDR:-localhost}"
    fi
    WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
}

# Validate on the CPU; prints the layout summary and memory plan, fails naming the field.
r1_dry_run() {
    local config="$1"
    shift
    "$PYTHON" -m megatron_r1.planning.dry_run_cli "$config" --world-size "$WORLD_SIZE" \
        --gpu-memory-gb "$GPU_MEMORY_GB" "$@"
}

r1_show() {
    printf 'would run:'
    printf ' %q' "$@"
    printf '\n'
}

# r1_main <command> <config> [args...]: a stage on every GPU of the allocation.
r1_main() {
    local command="$1" config="$2"
    shift 2
    r1_parse_args "$@"
    r1_defaults
    r1_launch_prefix
    local cmd=("${LAUNCH[@]}" "$command" "$config" "${STAGE_OVERRIDES[@]}" "${OVERRIDES[@]}")
    if ((DRY_RUN)); then
        r1_dry_run "$config" "${STAGE_OVERRIDES[@]}" "${OVERRIDES[@]}"
        r1_show "${cmd[@]}"
        return 0
    fi
    r1_export_env
    echo "[$(date -u +%FT%TZ)] ${cmd[*]}"
    "${cmd[@]}"
}

# r1_main_single <layout-config> <args...>: one process (checkpoint conversion) on the first node; the layout
# config is the one the converted checkpoint will be trained with, validated at the full world size.
r1_main_single() {
    local config="$1"
    shift
    local args=()
    while (($#)) && [[ "$1" != "--" ]]; do
        args+=("$1")
        shift
    done
    if (($#)); then shift; fi
    r1_parse_args "$@"
    r1_defaults
    local cmd=("$PYTHON" -m megatron_r1 "${args[@]}")
    if [[ "$LAUNCHER" == slurm ]]; then
        cmd=(srun --nodes 1 --ntasks 1 "${cmd[@]}")
    fi
    if ((DRY_RUN)); then
        r1_dry_run "$config" "${OVERRIDES[@]}"
        r1_show "${cmd[@]}"
        return 0
    fi
    r1_export_env
    echo "[$(date -u +%FT%TZ)] ${cmd[*]}"
    "${cmd[@]}"
}
