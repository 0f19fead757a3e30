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
if [[ ! -d "$WORKDIR" ]]; then
    echo "train_8b.sh: NEMO_GDRO_WORKDIR=${WORKDIR} is not a directory (the tasks run there)" >&2
    exit 2
fi
# Absolute: relative input paths below are taken from here, where the tasks run.
WORKDIR=$(cd "$WORKDIR" && pwd)
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
# Relative paths are taken from NEMO_GDRO_WORKDIR (where the tasks run), not from the
# submitting shell's directory. TRAIN_FILES paths cannot hold a comma, EVAL_FILES paths
# neither a comma nor a space (the separators): give such files as overrides instead.
# Set NEMO_GDRO_RECIPE_OVERRIDES (even empty) to replace all of this with your own overrides.
problems=()   # every wrong input, all listed before exiting
abs_path() { if [[ "$1" == /* ]]; then printf '%s' "$1"; else printf '%s' "${WORKDIR}/$1"; fi; }
# "a.parquet, b.parquet": the blanks around a list entry are no part of its path.
trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; printf '%s' "${s%"${s##*[![:space:]]}"}"; }
# One value in Hydra's override grammar: single-quoted, so that spaces, commas, '=',
# brackets and double quotes reach the config unchanged. Inside quotes Hydra reads
# backslashes only before a quote (or the closing quote): double those, escape the quote.
hydra_quote() {
    local s=$1 out="" run="" ch i
    for (( i = 0; i < ${#s}; i++ )); do
        ch=${s:i:1}
        if [[ "$ch" == "\\" ]]; then run+="\\"; continue; fi
        if [[ "$ch" == "'" ]]; then out+="${run}${run}\\'"; else out+="${run}${ch}"; fi
        run=""
    done
    printf "'%s'" "${out}${run}${run}"
}
# A path the config can hold verbatim: '${' would be read as an interpolation.
check_path_text() {
    [[ "$2" != *'${'* ]] || problems+=("$1 ${2}: contains '\${', which the config reads as an interpolation; rename or link the file")
}
RECIPE_ARGS=()
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
    model=$(abs_path "$MODEL_PATH")
    check_path_text MODEL_PATH "$model"
    shown=$MODEL_PATH; [[ "$model" == "$MODEL_PATH" ]] || shown+=" (= ${model})"
    [[ -f "${model}/config.json" ]] || problems+=("MODEL_PATH=${shown} has no config.json")
    train_values=()
    IFS=, read -r -a train_list <<< "$TRAIN_FILES"
    for f in "${train_list[@]}"; do
        f=$(trim "$f")
        [[ -n "$f" ]] || continue   # a stray comma: an empty entry, nothing to train on
        f=$(abs_path "$f")
        check_path_text "TRAIN_FILES entry" "$f"
        [[ -f "$f" ]] || problems+=("TRAIN_FILES entry ${f} does not exist")
        train_values+=("$(hydra_quote "$f")")
    done
    (( ${#train_values[@]} )) || problems+=("TRAIN_FILES='${TRAIN_FILES}' names no file")
    eval_args=()
    read -r -a eval_list <<< "$EVAL_FILES"
    for entry in "${eval_list[@]}"; do
        name=${entry%%=*}; files=${entry#*=}
        if [[ "$entry" != *=* || -z "$name" || -z "$files" ]]; then
            problems+=("EVAL_FILES entry '${entry}' is not benchmark=file[,file]"); continue
        fi
        values=()
        IFS=, read -r -a flist <<< "$files"
        for f in "${flist[@]}"; do
            [[ -n "$f" ]] || continue   # a stray comma
            f=$(abs_path "$f")
            check_path_text "EVAL_FILES ${name}:" "$f"
            [[ -f "$f" ]] || problems+=("EVAL_FILES ${name}: ${f} does not exist")
            values+=("$(hydra_quote "$f")")
        done
        (( ${#values[@]} )) || { problems+=("EVAL_FILES entry '${entry}' names no file"); continue; }
        joined=$(IFS=,; printf '%s' "${values[*]}")
        eval_args+=("++data.eval_files.${name}=[${joined}]")
    done
    train_joined=$(IFS=,; printf '%s' "${train_values[*]}")
    RECIPE_ARGS=("+recipe=${RECIPE}" "model.path=$(hydra_quote "$model")" "data.train_files=[${train_joined}]"
                 "${eval_args[@]}")
else
    # Your own overrides, space-separated (`read -a` splits on whitespace without globbing).
    read -r -a RECIPE_ARGS <<< "$NEMO_GDRO_RECIPE_OVERRIDES"
fi
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
# 0: skip the configuration check before srun (see "config check" below).
VALIDATE=${NEMO_GDRO_VALIDATE:-1}
# 1: check the inputs and the configuration, print the srun command, start no task.
CHECK_ONLY=${NEMO_GDRO_CHECK_ONLY:-0}

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
# An scontrol that cannot reach a controller (a login node, a stand-in job) leaves it to launch.py.
if [[ -z "${MASTER_ADDR:-}" ]] && command -v scontrol >/dev/null; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1) || MASTER_ADDR=""
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

# ------------------------------------------------------------------ config check
# What `nemo-gdro train` checks before building anything (keys, values, recipe,
# benchmark names, the parallel layout against the job's task count, the input
# files' types and headers, the model folder's weights), once here: a wrong
# input is named now, not by every task after srun started them all.
if [[ "$VALIDATE" == "1" ]]; then
    CHECK=("$PYTHON" -m nemo_gdro.cli train --validate-only "--world-size=${NTASKS}")
    [[ "$CONFIG_NAME" == "train" ]] || CHECK+=("--config-name=${CONFIG_NAME}")
    CHECK+=("${OVERRIDES[@]}")
    if [[ -n "$CONTAINER_IMAGE" ]]; then
        # The tasks' interpreter and mounts are the image's: check there, as one task.
        CHECK=(srun --ntasks=1 --nodes=1 "--container-image=${CONTAINER_IMAGE}"
               "--container-mounts=${CONTAINER_MOUNTS}" "--container-workdir=${CONTAINER_WORKDIR}" "${CHECK[@]}")
    fi
    if ! "${CHECK[@]}"; then
        problems+=("the configuration check failed: see the 'nemo-gdro train' line above")
    fi
fi
if (( ${#problems[@]} )); then
    printf 'train_8b.sh: %s\n' "${problems[@]}" >&2
    echo "train_8b.sh: ${#problems[@]} problem(s) with the inputs; no task was started" >&2
    exit 2
fi

log "srun ${SRUN_ARGS[*]} ${CMD[*]}"
if [[ "$CHECK_ONLY" == "1" ]]; then
    log "NEMO_GDRO_CHECK_ONLY=1: inputs and configuration checked; no task started"
    exit 0
fi

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
