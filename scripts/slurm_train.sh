#!/usr/bin/env bash
# Multi-node data-parallel training under SLURM: one torchrun launcher per node,
# one process per GPU. Submit with sbatch, passing the training arguments:
#
#   sbatch --nodes 4 --gpus-per-node 8 scripts/slurm_train.sh coco.yaml --model r50 --batch-size 4 --amp bf16
#
#SBATCH --job-name=ddetr-train
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}}"
NNODES="${SLURM_NNODES:-1}"
MASTER_ADDR="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
MASTER_PORT="${MASTER_PORT:-29500}"
DDETR="$(command -v ddetr)"

# Each node's launcher gets its rank from SLURM_NODEID via the rendezvous.
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
  --nnodes "$NNODES" \
  --nproc-per-node "$GPUS_PER_NODE" \
  --rdzv-id "${SLURM_JOB_ID}" \
  --rdzv-backend c10d \
  --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" \
  "$DDETR" train "$@"
