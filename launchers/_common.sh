# shellcheck shell=bash
# Shared by launchers/*.sbatch and launchers/single_node.sh (sourced, not run).
#
# Knobs (environment variables; all optional):
#   HD_REPO            repository root (default: the sbatch submit directory / the script's parent)
#   HD_PYTHON          python interpreter (default: python)
#   HD_LAUNCH          training entry point (default: $HD_REPO/launch.py)
#   HD_DS_CONFIG       DeepSpeed JSON used when the arguments have no --ds_config (default: ds_configs/zero2.json)
#   HD_LOG_DIR         per-task logs, stop/requeue marker files (default: $HD_REPO/logs; must be on a shared FS)
#   HD_GPUS_PER_NODE   processes per node (default: SLURM_GPUS_ON_NODE / CUDA_VISIBLE_DEVICES / nvidia-smi / 1)
#   HD_ACCELERATOR     "cpu" runs on CPU: DS_ACCELERATOR=cpu, gloo (tests, debugging); default: cuda/NCCL
#   HD_MAX_REQUEUES    stop requeueing after this many restarts (default 50)
#   HD_DIST_TIMEOUT_S  process-group timeout in seconds (default 600): a dead rank makes the rest fail, not hang

hd_log() {
    echo "[hybrid-distill $(date '+%F %T')] $*"
}

# Environment every rank needs: threads, NCCL error handling, accelerator, python output.
hd_setup_env() {
    # One OpenMP thread pool per rank, sized to its CPUs (8 ranks x all cores would oversubscribe).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    # A failed/timed-out NCCL collective aborts the process instead of hanging (torch >= 2.2 name + old name).
    export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
    export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"
    # WARN prints only problems; INFO shows the chosen transports (IB/socket) when debugging.
    export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
    # Pin the network NCCL uses when nodes have several (uncomment and adapt to your cluster):
    # export NCCL_SOCKET_IFNAME=ib0          # or "^lo,docker0" to exclude interfaces
    # export NCCL_IB_HCA=mlx5                # InfiniBand adapters to use
    # export GLOO_SOCKET_IFNAME=ib0          # the same for gloo (CPU runs)
    export HD_DIST_TIMEOUT_S="${HD_DIST_TIMEOUT_S:-600}"
    # Slurm >= 22.05: srun no longer inherits --cpus-per-task from the job; without this, CPU binding may pin all
    # of a task's threads and data workers to one core.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
    fi
    # Unbuffered output so SLURM logs are live; Python stack dumps on fatal signals (segfault, abort).
    export PYTHONUNBUFFERED=1
    export PYTHONFAULTHANDLER=1
    if [[ "${HD_ACCELERATOR:-}" == "cpu" ]]; then
        export DS_ACCELERATOR=cpu
    fi
}

# Training arguments: the caller's "$@", plus --ds_config (if absent) and --resume auto (if absent).
# Sets the array HD_ARGS.
hd_build_args() {
    local has_ds=0 has_resume=0 arg
    for arg in "$@"; do
        case "$arg" in
            --ds_config|--ds_config=*|--deepspeed_config|--deepspeed_config=*) has_ds=1 ;;
            --resume|--resume=*) has_resume=1 ;;
        esac
    done
    # Added options go first: launch.py's dotted overrides are positional and must not be split by options.
    HD_ARGS=()
    if (( ! has_ds )); then
        HD_ARGS+=(--ds_config "${HD_DS_CONFIG:-ds_configs/zero2.json}")
    fi
    if (( ! has_resume )); then
        HD_ARGS+=(--resume auto)
    fi
    HD_ARGS+=("$@")
}

# Processes per node: HD_GPUS_PER_NODE, else SLURM's task/GPU count, else nvidia-smi, else 1.
hd_gpus_per_node() {
    if [[ -n "${HD_GPUS_PER_NODE:-}" ]]; then
        echo "$HD_GPUS_PER_NODE"
    elif [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        local ids
        IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        nvidia-smi -L | wc -l
    else
        echo 1
    fi
}

# Common start of both sbatch scripts: repo, logs, marker files, environment, arguments.
hd_slurm_setup() {
    HD_PYTHON="${HD_PYTHON:-python}"
    HD_LAUNCH="${HD_LAUNCH:-$HD_REPO/launch.py}"
    HD_LOG_DIR="${HD_LOG_DIR:-$HD_REPO/logs}"
    mkdir -p "$HD_LOG_DIR"
    cd "$HD_REPO"
    local run="${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}.r${SLURM_RESTART_COUNT:-0}"
    # sbatch exports the submitting shell's environment: a RANK/WORLD_SIZE left there (a shell inside another job,
    # a torchrun session) would override SLURM's task ids and put every task into a world of its own. The ranks
    # come from srun (SLURM_PROCID) or from the DeepSpeed launcher here, never from the submitter.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK
    # Stop request forwarded by the batch shell (deepspeed-launcher variant); polled by every rank.
    export HD_STOP_FILE="${HD_STOP_FILE:-$HD_LOG_DIR/$run.stop}"
    # Written by rank 0 when all ranks agreed to stop (hybrid_distill.runtime.cluster.StopRequest).
    export HD_STOPPED_FILE="${HD_STOPPED_FILE:-$HD_LOG_DIR/$run.stopped}"
    rm -f "$HD_STOP_FILE" "$HD_STOPPED_FILE"
    # From here on a stop request during start-up (B:USR1 before the training step exists) becomes the stop file
    # the ranks see at their first step, instead of killing this shell.
    trap 'hd_request_stop USR1' USR1
    trap 'hd_request_stop TERM' TERM
    HD_TASK_LOG_PREFIX="$HD_LOG_DIR/$run"
    hd_setup_env
    hd_build_args "$@"
    hd_log "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES} node(s):" \
        "${SLURM_JOB_NODELIST}; repo $HD_REPO; per-task logs ${HD_TASK_LOG_PREFIX}.*"
}

# Master address/port shared by every rank of the job: NodeAddr of the first node, port from the job id.
hd_master() {
    export MASTER_ADDR="${MASTER_ADDR:-$("$HD_PYTHON" -m hybrid_distill.runtime.cluster master-addr)}"
    export MASTER_PORT="${MASTER_PORT:-$("$HD_PYTHON" -m hybrid_distill.runtime.cluster master-port)}"
    hd_log "rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
}

# The batch shell's signal handler: SLURM signals it (--signal=B:USR1@T, scancel -b, SIGTERM on cancel or
# preemption); the request reaches the trainers through the stop file they poll at every step.
# SIGTERM means the job is being cancelled (scancel, time limit, preemption): the ranks still checkpoint if
# they can, but the job must not requeue itself (SLURM requeues preempted --requeue jobs on its own).
hd_request_stop() {
    HD_STOP_REQUESTED=1
    [[ "$1" == TERM ]] && HD_TERMINATED=1
    hd_log "${HD_SHELL:-batch shell} received SIG$1: asking every rank to checkpoint and stop (created $HD_STOP_FILE)"
    touch "$HD_STOP_FILE"
}

# Ctrl-C (single_node.sh): the first asks for a checkpoint and stop, a second kills the step's process group.
hd_interrupt() {
    if [[ -n "${HD_INTERRUPTED:-}" && -n "${HD_STEP_PID:-}" ]]; then
        hd_log "second Ctrl-C: killing the ranks WITHOUT a checkpoint"
        kill -KILL -- "-$HD_STEP_PID" 2>/dev/null || true
        return
    fi
    HD_INTERRUPTED=1
    hd_request_stop INT
    hd_log "press Ctrl-C again to kill the ranks without a checkpoint"
}

# Run a job step ("$@", an srun command) in the background so that the batch shell can handle signals while
# it runs (bash runs traps only between commands), and wait for it. Sets HD_STEP_RC.
hd_run_step() {
    trap 'hd_request_stop USR1' USR1
    trap 'hd_request_stop TERM' TERM
    "$@" &
    local pid=$!
    HD_STEP_PID=$pid
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true  # returns early (>128) when a trapped signal arrives
    done
    set +e
    wait "$pid"
    # shellcheck disable=SC2034  # read by the calling script
    HD_STEP_RC=$?
    set -e
}

# Decide what the job does after the training step exited with $1:
#   0 -> done;
#   cancelled (the batch shell or the ranks got SIGTERM: scancel, time limit, preemption) -> exit, never
#       requeue here (a cancelled job must stay cancelled; SLURM itself requeues preempted --requeue jobs);
#   75 (EXIT_REQUEUE), or any failure after all ranks agreed to stop -> scontrol requeue (the job resumes
#       with --resume auto);
#   anything else -> fail with that code (no requeue loop on real crashes).
hd_finish() {
    local rc="$1" stopped=0 reason=""
    if [[ -e "$HD_STOPPED_FILE" ]]; then
        reason="$(head -n 1 "$HD_STOPPED_FILE")"
        stopped=1
    fi
    [[ "${HD_STOP_REQUESTED:-0}" == 1 ]] && stopped=1
    rm -f "$HD_STOP_FILE" "$HD_STOPPED_FILE"
    if (( rc == 0 )); then
        hd_log "training step finished (exit 0)"
        exit 0
    fi
    if [[ "${HD_TERMINATED:-0}" == 1 || "$reason" == *SIGTERM* ]]; then
        hd_log "training step ended (exit $rc) after SIGTERM (${reason:-batch shell}): job cancelled or" \
            "preempted, not requeueing here; resubmit with the same --output-dir to resume"
        exit "$rc"
    fi
    if (( rc == 75 || stopped )); then
        if (( ${SLURM_RESTART_COUNT:-0} >= ${HD_MAX_REQUEUES:-50} )); then
            hd_log "stopped (exit $rc) but already restarted ${SLURM_RESTART_COUNT:-0} times; not requeueing"
            exit "$rc"
        fi
        hd_log "stopped on request (exit $rc; ${reason:-no agreed-stop marker}): requeueing job ${SLURM_JOB_ID}"
        if ! scontrol requeue "$SLURM_JOB_ID"; then
            hd_log "scontrol requeue FAILED (see above); the checkpoint is saved: submit the same command again" \
                "with the same --output-dir to resume"
            exit "$rc"
        fi
        exit 0
    fi
    hd_log "training step FAILED with exit $rc; the srun lines above name the failing task/node; see" \
        "${HD_TASK_LOG_PREFIX}.* for each task"
    hd_tail_task_logs
    exit "$rc"
}

hd_tail_task_logs() {
    local f
    for f in "${HD_TASK_LOG_PREFIX}".*.log; do
        [[ -e "$f" ]] || continue
        echo "---- last lines of $f"
        tail -n 15 "$f"
    done
}
