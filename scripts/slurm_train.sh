#!/usr/bin/env bash
# Multi-node data-parallel training under SLURM: one torchrun launcher per node,
# one process per GPU. Submit with sbatch, passing the training arguments:
#
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh coco.yaml --model r50 --batch-size 4 --amp bf16
#
# Preemption: SLURM sends SIGUSR1 to this script 180 s before the time limit (--signal) and SIGTERM
# when it preempts the job. Either way the script asks the training processes to stop (SIGTERM, which
# torchrun passes on): they finish the current step, save weights/last.pt and exit; the job is then
# requeued, and the requeued job continues the same run folder with --resume. The run folder is
# RUN_DIR if set, else runs/train/slurm-<job id>.
#
#SBATCH --job-name=ddetr-train
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}}"
NNODES="${SLURM_NNODES:-1}"
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
DDETR="$(command -v ddetr)"
RUN_DIR="${RUN_DIR:-runs/train/slurm-${SLURM_JOB_ID}}"

if [[ -f "$RUN_DIR/weights/last.pt" ]]; then
  ARGS=(--resume "$RUN_DIR")            # a requeued job: continue the run
else
  ARGS=("$@" --out "$RUN_DIR")
fi

# Each node's launcher gets its rank from SLURM_NODEID via the rendezvous.
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "${SLURM_JOB_ID}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
  "$DDETR" train "${ARGS[@]}" &
TRAIN_PID=$!

preempted() {
  echo "preemption signal: stopping training (last.pt is saved) and requeueing job ${SLURM_JOB_ID}" >&2
  kill -TERM "$TRAIN_PID" 2>/dev/null || true
  wait "$TRAIN_PID" || true
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
}
trap preempted USR1 TERM

wait "$TRAIN_PID"
