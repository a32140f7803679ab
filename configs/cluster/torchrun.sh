#!/bin/bash
# Multi-node training with torchrun (no scheduler): run this on every node with NODE_RANK set.
#   MASTER_ADDR=node0 NODE_RANK=0 NNODES=2 bash configs/cluster/torchrun.sh configs/sd15/decoupled.yaml
# Several configs stack in order (SDXL: configs/sd15/decoupled.yaml configs/sdxl/decoupled.yaml).
set -euo pipefail
CONFIGS=()
for c in "${@:-configs/sd15/decoupled.yaml}"; do CONFIGS+=(-c "$c"); done
NNODES=${NNODES:-1}
GPUS=${GPUS:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m emojidiff.cli fit "${CONFIGS[@]}" -c configs/cluster/ddp.yaml \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS"
