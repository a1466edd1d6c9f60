#!/usr/bin/env bash
# Single-node data-parallel training: one process per GPU (or CPU processes with gloo).
#
#   scripts/torchrun_train.sh 8 coco.yaml --model r50 --epochs 50 --batch-size 4 --amp bf16
#   NPROC=2 scripts/torchrun_train.sh shapes          # NPROC may also come from the environment
#
# --batch-size is per process; the global batch is NPROC x batch size. Only rank 0
# writes the run folder; resume with the same command plus --resume RUN_DIR.
set -euo pipefail

if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then
  NPROC="$1"
  shift
fi
NPROC="${NPROC:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
MASTER_PORT="${MASTER_PORT:-29500}"
DDETR="$(command -v ddetr || true)"
if [[ -z "$DDETR" ]]; then
  echo "error: the ddetr command is not on PATH (pip install -e .)" >&2
  exit 1
fi

exec python -m torch.distributed.run \
  --standalone \
  --nproc-per-node "$NPROC" \
  --master-port "$MASTER_PORT" \
  "$DDETR" train "$@"
