# shellcheck shell=bash
# Shared body of every slurm/*.sbatch: environment, rendezvous, hostfile, launch, preemption.
# Sourced by a template after it has set STAGE (and its own defaults); not run on its own.
#
# Every setting below is `VAR=${VAR:-default}`: export VAR before `sbatch` to override it
# (sbatch passes the submitting shell's environment to the job). See slurm/README.md.

set -euo pipefail

: "${STAGE:?the template must set STAGE before sourcing slurm/common.sh}"
: "${SLURM_JOB_ID:?submit this script with sbatch (it reads the SLURM allocation)}"

# ---------------------------------------------------------------------------- paths
# sbatch runs a copy of the script from a spool directory: locate the repo by the submit dir.
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR"
# Site setup (module load cuda, conda activate, proxies, ...): a file sourced here, on every node's
# environment too since srun passes the batch environment on.
if [[ -n ${SETUP_SCRIPT:-} ]]; then
    # shellcheck disable=SC1090
    source "$SETUP_SCRIPT"
fi
if [[ -n ${VENV:-} ]]; then
    export PATH="$VENV/bin:$PATH"
fi
PYTHON=${PYTHON:-python}
DEEPSPEED=${DEEPSPEED:-deepspeed}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}

RUN_NAME=${RUN_NAME:-${STAGE}-${SLURM_JOB_ID}}          # a requeued job keeps its id, so its dir
OUTPUT_DIR=${OUTPUT_DIR:-$REPO_DIR/outputs/$RUN_NAME}   # too: --resume_from_checkpoint auto finds it
LOG_DIR=${LOG_DIR:-$REPO_DIR/slurm/logs}                # the #SBATCH --output file is here too
JOB_DIR=${JOB_DIR:-$LOG_DIR/$SLURM_JOB_ID}              # this job's hostfile and per-rank logs
mkdir -p "$OUTPUT_DIR" "$JOB_DIR"

# ---------------------------------------------------------------------------- scale
NNODES=${SLURM_NNODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}   # ranks per node (CPU runs: processes)
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-$(nproc)}

# ---------------------------------------------------------------------------- environment
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS_PER_TASK / GPUS_PER_NODE > 0 ? CPUS_PER_TASK / GPUS_PER_NODE : 1 ))}
# JIT-built DeepSpeed ops: a per-job, node-local dir avoids two jobs building into one shared dir
# at once; point it at a prebuilt shared dir to skip the 1-3 min build.
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/torch_extensions-$SLURM_JOB_ID}
# Fail a collective whose peer died instead of hanging until the NCCL timeout.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# The interface that reaches the other nodes (e.g. ib0, eth0, bond0). Unset, NCCL and gloo pick
# one from the hostname, which fails when the hostname resolves to 127.0.x.x (hostfiles/README.md).
if [[ -n ${NET_IFNAME:-} ]]; then
    export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$NET_IFNAME}
    export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NET_IFNAME}
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}

# ---------------------------------------------------------------------------- rendezvous
# Node 0's ADDRESS from slurm (NodeAddr): its name may not resolve on the other nodes.
mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show node "${NODES[0]}" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')}
MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
# A port derived from the job id: two jobs sharing a node do not collide, a requeue reuses it.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT

HOSTFILE=${HOSTFILE:-$JOB_DIR/hostfile}
"$PYTHON" "$REPO_DIR/tools/make_hostfile.py" --nodelist "$SLURM_JOB_NODELIST" --slots "$GPUS_PER_NODE" --output "$HOSTFILE"

echo "[medgpt] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) stage=$STAGE nodes=${NODES[*]}" \
     "ranks=$WORLD_SIZE master=$MASTER_ADDR:$MASTER_PORT output=$OUTPUT_DIR"

# ---------------------------------------------------------------------------- preemption
# `#SBATCH --signal=B:USR1@<secs>` sends USR1 to THIS shell only (without "B:" slurm would signal
# the deepspeed launchers, which have no USR1 handler and die). We turn it (and a TERM to this
# shell) into the trainer's stop file: rank 0 sees it at the next step, every rank saves a
# complete checkpoint, the trainer writes PREEMPTED and exits 0; then we requeue the job and the
# rerun resumes with --resume_from_checkpoint auto.
STOP_FILE=$OUTPUT_DIR/.stop
PREEMPTED_FILE=$OUTPUT_DIR/PREEMPTED
MAX_REQUEUES=${MAX_REQUEUES:-20}
rm -f "$STOP_FILE" "$PREEMPTED_FILE"   # stale ones from the run we are resuming

request_stop() {
    echo "[medgpt] $(date +%T) received $1: asking the trainer to checkpoint and stop"
    touch "$STOP_FILE"
}
trap 'request_stop USR1' USR1
trap 'request_stop TERM' TERM

# ---------------------------------------------------------------------------- helpers
# model_args: the model flags, from MODEL (HF dir or hub id) or, for from-scratch/test runs,
# MODEL_CONFIG (a preset name or config.json) + TOKENIZER. Sets the array MODEL_ARGS.
model_args() {
    if [[ -n ${MODEL_CONFIG:-} ]]; then
        MODEL_ARGS=(--model_config "$MODEL_CONFIG" --tokenizer_name_or_path "${TOKENIZER:?MODEL_CONFIG needs TOKENIZER}")
    else
        MODEL_ARGS=(--model_name_or_path "${MODEL:?set MODEL}")
        [[ -n ${TOKENIZER:-} ]] && MODEL_ARGS+=(--tokenizer_name_or_path "$TOKENIZER")
    fi
    return 0
}

# precision_args: PRECISION=bf16 | fp16 | fp32 -> the trainer flag (fp32: none; CPU runs).
precision_args() {
    case ${PRECISION:-bf16} in
        bf16) PRECISION_ARGS=(--bf16) ;;
        fp16) PRECISION_ARGS=(--fp16) ;;
        fp32) PRECISION_ARGS=() ;;
        *) echo "PRECISION must be bf16, fp16 or fp32, got '$PRECISION'" >&2; exit 2 ;;
    esac
}

# ---------------------------------------------------------------------------- launch
# run_training ARGS...: one srun task per node; each runs `deepspeed --no_ssh --node_rank
# $SLURM_NODEID` (expanded on its node), which starts GPUS_PER_NODE ranks there.
# --kill-on-bad-exit=1: one failed node launcher kills the whole step within seconds.
run_training() {
    local srun_args=(--nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --label)
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    # shellcheck disable=SC2206  # word splitting wanted: extra srun flags
    srun_args+=(${SRUN_EXTRA_ARGS:-})
    local ds_args=(--hostfile "$HOSTFILE" --no_ssh --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    [[ ${RANK_LOGS:-0} == 1 ]] && ds_args+=(--enable_each_rank_log "$JOB_DIR/ranks")
    # shellcheck disable=SC2206
    local extra=(${EXTRA_ARGS:-})

    echo "[medgpt] srun ${srun_args[*]} $DEEPSPEED ${ds_args[*]} --node_rank \$SLURM_NODEID $TRAIN_SCRIPT $* ${extra[*]}"
    # In the background so the traps above run while the step is going (bash delays traps
    # until a foreground child exits). The node's deepspeed runner ignores TERM (`trap "" TERM`
    # survives exec): on a TERM to the step's processes (`scancel --signal=TERM <job>`) it would
    # die at once and srun would kill the ranks mid-checkpoint; deepspeed.launcher.launch below
    # it passes TERM to the ranks, which checkpoint and exit. (A TERM that reaches srun itself,
    # e.g. the time limit without the USR1 warning, makes srun SIGKILL every task.)
    srun "${srun_args[@]}" bash -c 'trap "" TERM; exec "$0" --node_rank "$SLURM_NODEID" "$@"' \
        "$DEEPSPEED" "${ds_args[@]}" "$TRAIN_SCRIPT" "$@" "${extra[@]}" &
    local pid=$! rc=0
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" && rc=0 || rc=$?    # >128 when a trapped signal interrupted the wait
    done
    wait "$pid" && rc=0 || rc=$?        # the step's real exit status

    if [[ -f $PREEMPTED_FILE ]]; then
        if (( ${SLURM_RESTART_COUNT:-0} < MAX_REQUEUES )); then
            echo "[medgpt] $(date +%T) checkpoint saved ($(cat "$PREEMPTED_FILE")); requeueing job $SLURM_JOB_ID"
            scontrol requeue "$SLURM_JOB_ID"
            exit 0
        fi
        echo "[medgpt] preempted but MAX_REQUEUES=$MAX_REQUEUES reached: not requeueing"
        exit 1
    fi
    echo "[medgpt] $(date +%T) step finished with exit code $rc"
    exit "$rc"
}
