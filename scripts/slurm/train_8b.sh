#!/usr/bin/env bash
# nemo-gdro RL training on a multi-node H100 Slurm cluster: Qwen3-8B-Base on
# DAPO-Math with the math-verify reward (the qwen3_8b_dapo recipe), one task per
# GPU, torch.distributed initialised from the Slurm task variables (no torchrun).
# Submit from the repository root:
#
#   MODEL_PATH=/ckpt/Qwen3-8B-Base TRAIN_FILES=/data/dapo-math-17k.parquet \
#   EVAL_FILES="math500=/data/math500.jsonl aime24=/data/aime_2024.parquet" \
#   sbatch --nodes=2 --account=ACCT --partition=PART scripts/slurm/train_8b.sh [override ...]
#
# Every #SBATCH line below is a default: a command-line option or an SBATCH_*
# environment variable (sbatch's own) replaces it. Everything else is an
# environment variable read below; scripts/slurm/README.md lists them all.
# Preemption or the time limit requeues the job and the next run continues
# from the newest complete checkpoint (run.resume=auto).
#
#SBATCH --job-name=nemo-gdro-qwen3-8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=nemo-gdro-%x-%j.out

set -euo pipefail

log() { echo "[train_8b.sh $(date -u +%FT%TZ)] $*"; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "train_8b.sh runs inside a Slurm allocation: submit it with sbatch (see scripts/slurm/README.md)" >&2
    exit 2
fi

# ------------------------------------------------------------------ settings
# sbatch runs a spooled copy of this file, so paths are anchored at the
# submission directory (the repository root), not at $0.
WORKDIR=${NEMO_GDRO_WORKDIR:-${SLURM_SUBMIT_DIR:-$PWD}}
# The interpreter that has nemo_gdro installed (inside the container when one is used).
PYTHON=${NEMO_GDRO_PYTHON:-python3}
# GPUs per node; 0 = CPU mode (gloo), as in the CPU test cluster.
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
RECIPE=${RECIPE:-qwen3_8b_dapo}
RUN_NAME=${RUN_NAME:-${RECIPE}}
OUTPUT_DIR=${OUTPUT_DIR:-${WORKDIR}/outputs/${RUN_NAME}}
CONFIG_NAME=${CONFIG_NAME:-train}
# The recipe (nemo_gdro/conf/recipe/<name>.yaml) and its three inputs:
#   MODEL_PATH   HF checkpoint directory (config.json, *.safetensors, tokenizer files)
#   TRAIN_FILES  comma-separated JSONL / Parquet training files (DAPO-Math-17k layout or id,prompt,answer)
#   EVAL_FILES   space-separated benchmark=file[,file] entries, benchmarks: aime24 aime25 amc23
#                math500 minerva olympiadbench gpqa_diamond
# Set NEMO_GDRO_RECIPE_OVERRIDES (even empty) to replace all of this with your own overrides.
if [[ -z "${NEMO_GDRO_RECIPE_OVERRIDES+set}" ]]; then
    missing=()
    [[ -n "${MODEL_PATH:-}" ]] || missing+=("MODEL_PATH (HF checkpoint dir)")
    [[ -n "${TRAIN_FILES:-}" ]] || missing+=("TRAIN_FILES (comma-separated JSONL/Parquet)")
    [[ -n "${EVAL_FILES:-}" ]] || missing+=("EVAL_FILES (e.g. \"math500=/data/math500.jsonl aime24=/data/aime24.parquet\")")
    if (( ${#missing[@]} )); then
        printf 'train_8b.sh: recipe %s needs these environment variables:\n' "$RECIPE" >&2
        printf '  %s\n' "${missing[@]}" >&2
        echo "(or set NEMO_GDRO_RECIPE_OVERRIDES to run your own overrides instead of the recipe)" >&2
        exit 2
    fi
    [[ -f "${MODEL_PATH}/config.json" ]] || { echo "train_8b.sh: MODEL_PATH=${MODEL_PATH} has no config.json" >&2; exit 2; }
    IFS=, read -r -a train_list <<< "$TRAIN_FILES"
    for f in "${train_list[@]}"; do
        [[ -f "$f" ]] || { echo "train_8b.sh: TRAIN_FILES entry ${f} does not exist" >&2; exit 2; }
    done
    eval_args=""
    read -r -a eval_list <<< "$EVAL_FILES"
    for entry in "${eval_list[@]}"; do
        name=${entry%%=*}; files=${entry#*=}
        if [[ "$entry" != *=* || -z "$name" || -z "$files" ]]; then
            echo "train_8b.sh: EVAL_FILES entry '${entry}' is not benchmark=file[,file]" >&2; exit 2
        fi
        IFS=, read -r -a flist <<< "$files"
        for f in "${flist[@]}"; do
            [[ -f "$f" ]] || { echo "train_8b.sh: EVAL_FILES ${name}: ${f} does not exist" >&2; exit 2; }
        done
        eval_args+=" ++data.eval_files.${name}=[${files}]"
    done
    NEMO_GDRO_RECIPE_OVERRIDES="+recipe=${RECIPE} model.path=${MODEL_PATH} data.train_files=[${TRAIN_FILES}]${eval_args}"
fi
RECIPE_OVERRIDES=$NEMO_GDRO_RECIPE_OVERRIDES
# Extra Hydra overrides (space-separated); the script's arguments come last and win.
CONFIG_OVERRIDES=${NEMO_GDRO_CONFIG_OVERRIDES:-}
# Container (pyxis/enroot): empty runs on the host.
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-${WORKDIR}:${WORKDIR}}
CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-${WORKDIR}}
SRUN_EXTRA_ARGS=${SRUN_EXTRA_ARGS:-}
# Guard against a job that keeps hitting its limit without progress.
MAX_REQUEUES=${MAX_REQUEUES:-20}
# 1: start every task but only print what each would be (rank, world, rendezvous).
DRY_RUN=${NEMO_GDRO_DRY_RUN:-0}

cd "$WORKDIR"

NTASKS=${SLURM_NTASKS:?SLURM_NTASKS not set: request tasks with --ntasks-per-node}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
RESTARTS=${SLURM_RESTART_COUNT:-0}
log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${RESTARTS}: ${NNODES} node(s) [${SLURM_JOB_NODELIST}], ${NTASKS} task(s), ${GPUS_PER_NODE} GPU(s)/node, workdir ${WORKDIR}"
if (( RESTARTS > MAX_REQUEUES )); then
    log "restarted ${RESTARTS} times (> MAX_REQUEUES=${MAX_REQUEUES}); giving up"
    exit 1
fi

# ------------------------------------------------------------------ environment
# Rendezvous: nemo_gdro.parallel.launch derives the same values from the Slurm
# variables; exporting them here makes the job log show them and lets a
# container without scontrol skip the node-list parse.
if [[ -z "${MASTER_ADDR:-}" ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
export MASTER_ADDR=${MASTER_ADDR:-}
[[ -n "$MASTER_ADDR" ]] || unset MASTER_ADDR
# Same formula as nemo_gdro.parallel.launch.port_from_job_id (15000 + id mod 10000).
export MASTER_PORT=${MASTER_PORT:-$(( 15000 + SLURM_JOB_ID % 10000 ))}
log "rendezvous ${MASTER_ADDR:-<first node>}:${MASTER_PORT}"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
if (( GPUS_PER_NODE > 0 )); then
    if (( NTASKS != NNODES * GPUS_PER_NODE )); then
        log "warning: ${NTASKS} tasks for ${NNODES} x ${GPUS_PER_NODE} GPUs; expected one task per GPU"
    fi
    # Megatron's TP/sequence-parallel comm overlap needs one CUDA work queue.
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    # Site network settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) come from the submitting environment.
fi

# ------------------------------------------------------------------ command
# `read -a` splits on whitespace without globbing (`edges=[0.1,0.2]` is a glob pattern).
read -r -a RECIPE_ARGS <<< "$RECIPE_OVERRIDES"
read -r -a CONFIG_ARGS <<< "$CONFIG_OVERRIDES"
read -r -a SRUN_EXTRA <<< "$SRUN_EXTRA_ARGS"
OVERRIDES=("${RECIPE_ARGS[@]}" "run.name=${RUN_NAME}" "run.output_dir=${OUTPUT_DIR}" "run.resume=auto" "${CONFIG_ARGS[@]}" "$@")
if [[ "$DRY_RUN" == "1" ]]; then
    CMD=("$PYTHON" -m nemo_gdro.parallel.launch)
else
    CMD=("$PYTHON" -m nemo_gdro.cli train)
    # The embedded config is "train"; other names need the CLI's --config-name.
    [[ "$CONFIG_NAME" == "train" ]] || CMD+=("--config-name=${CONFIG_NAME}")
    CMD+=("${OVERRIDES[@]}")
fi

# srun (22.05+) no longer inherits --cpus-per-task from the job, so pass it on.
SRUN_ARGS=(--kill-on-bad-exit=1 --label "--cpus-per-task=${SLURM_CPUS_PER_TASK:-1}")
if [[ -n "$CONTAINER_IMAGE" ]]; then
    SRUN_ARGS+=("--container-image=${CONTAINER_IMAGE}" "--container-mounts=${CONTAINER_MOUNTS}"
                "--container-workdir=${CONTAINER_WORKDIR}")
fi
SRUN_ARGS+=("${SRUN_EXTRA[@]}")

log "srun ${SRUN_ARGS[*]} ${CMD[*]}"

# ------------------------------------------------------------------ requeue
# --signal=B:USR1@300 warns this shell 5 minutes before the time limit; the
# job goes back to the queue and the next run resumes from the newest
# checkpoint (progress since then is recomputed). Preemption with
# PreemptMode=REQUEUE needs nothing here: --requeue reruns this script.
# shellcheck disable=SC2317  # invoked by the trap
requeue() {
    log "time limit near: requeueing job ${SLURM_JOB_ID}"
    scontrol requeue "$SLURM_JOB_ID" || log "scontrol requeue failed"
}
trap requeue USR1

# srun in the background: bash runs a trap only between commands, so waiting
# on a foreground srun would delay the requeue until training ended.
srun "${SRUN_ARGS[@]}" "${CMD[@]}" &
SRUN_PID=$!
rc=0
while true; do
    wait "$SRUN_PID" && rc=0 || rc=$?
    # A signal interrupts `wait` (rc > 128) while srun still runs: keep waiting.
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
log "srun exited with ${rc}"
exit "$rc"
