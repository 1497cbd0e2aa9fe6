#!/bin/bash
# One machine, all its GPUs: the DeepSpeed launcher starts one rank per GPU.
#
#   launchers/single_node.sh --preset vitb_in1k_deit_mae --output-dir runs/vitb [section.key=value ...]
#   HD_GPUS_PER_NODE=4 launchers/single_node.sh ...         # use 4 GPUs (default: all, from nvidia-smi)
#   HD_ACCELERATOR=cpu HD_GPUS_PER_NODE=2 launchers/single_node.sh run.max_steps=20   # CPU, 2 ranks, gloo
#
# Equivalent to `deepspeed --num_gpus N launch.py --ds_config ds_configs/zero2.json --resume auto ARGS`:
# --ds_config and --resume auto are added unless given, so re-running the same command continues the run.
# Graceful stop: `kill <pid of this script>` (SIGTERM), SIGUSR1, Ctrl-C, or `touch <output-dir>/STOP`: every rank
# checkpoints at the next step boundary and this script exits with code 75; run the same command again to resume.
# (The script creates the stop file $HD_STOP_FILE that the ranks poll: the deepspeed launcher itself forwards no
# signal on one node.) A second Ctrl-C kills the ranks at once, WITHOUT a checkpoint (the last one is kept).
# With CUDA_VISIBLE_DEVICES set, the ranks use those GPUs (the first HD_GPUS_PER_NODE of them): passed to the
# launcher as --include localhost:IDS, because with --num_gpus it would ignore the variable and use GPUs 0..N-1.
set -euo pipefail

HD_REPO="${HD_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=launchers/_common.sh
source "$HD_REPO/launchers/_common.sh"
cd "$HD_REPO"
gpus="$(hd_gpus_per_node)"
# Default OMP threads: the machine's cores split between the ranks.
cores="$(nproc)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( cores / gpus > 0 ? cores / gpus : 1 ))}"
hd_setup_env
hd_build_args "$@"
hd_log "deepspeed launcher: $gpus rank(s) on $(hostname), args: ${HD_ARGS[*]}"
devices=(--num_gpus "$gpus")
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" && "${HD_ACCELERATOR:-}" != cpu ]]; then
    IFS=, read -r -a ids <<< "$CUDA_VISIBLE_DEVICES"
    ids=("${ids[@]:0:gpus}")
    devices=(--include "localhost:$(IFS=,; echo "${ids[*]}")")
fi
HD_SHELL="single_node.sh"
export HD_STOP_FILE="${HD_STOP_FILE:-$(mktemp -u "${TMPDIR:-/tmp}/hd-stop.XXXXXXXX")}"
rm -f "$HD_STOP_FILE"
trap 'hd_interrupt' INT
# Its own session: a second Ctrl-C can kill the launcher with all its ranks (and only them).
hd_run_step setsid "${HD_PYTHON:-python}" -m deepspeed.launcher.runner "${devices[@]}" \
    --master_port "${MASTER_PORT:-29500}" "${HD_LAUNCH:-launch.py}" "${HD_ARGS[@]}"
rm -f "$HD_STOP_FILE"
hd_log "deepspeed launcher exited with $HD_STEP_RC"
exit "$HD_STEP_RC"
