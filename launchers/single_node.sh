#!/bin/bash
# One machine, all its GPUs: the DeepSpeed launcher starts one rank per GPU.
#
#   launchers/single_node.sh --preset vitb_in1k_deit_mae --output-dir runs/vitb [section.key=value ...]
#   HD_GPUS_PER_NODE=4 launchers/single_node.sh ...         # use 4 GPUs (default: all, from nvidia-smi)
#   HD_ACCELERATOR=cpu HD_GPUS_PER_NODE=2 launchers/single_node.sh run.max_steps=20   # CPU, 2 ranks, gloo
#
# Equivalent to `deepspeed --num_gpus N launch.py --ds_config ds_configs/zero2.json --resume auto ARGS`:
# --ds_config and --resume auto are added unless given, so re-running the same command continues the run.
# Graceful stop: `touch <output-dir>/STOP` (or $HD_STOP_FILE): every rank checkpoints at the next step boundary
# and the run exits with code 75; run the same command again to resume. Ctrl-C in the terminal reaches every
# rank as SIGINT and aborts at once WITHOUT a checkpoint (the last periodic one is kept): stop with the STOP file.
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
exec "${HD_PYTHON:-python}" -m deepspeed.launcher.runner "${devices[@]}" --master_port "${MASTER_PORT:-29500}" \
    "${HD_LAUNCH:-launch.py}" "${HD_ARGS[@]}"
