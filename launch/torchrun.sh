#!/usr/bin/env bash
# All-reduce aggregation without a coordinator: every rank trains its share of each round's
# clients and the weighted deltas are summed with torch.distributed (gloo on CPU, nccl on GPU).
# Rank 0 writes the run directory (checkpoints, metrics.jsonl, adapter/).
set -euo pipefail

# torchrun sets 1 thread per rank anyway, with a banner about it when the variable is unset
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# one machine, two ranks
torchrun --nproc-per-node 2 -m dpeft_launch.torchrun_allreduce \
  rounds=3 clients=8 clients_per_round=4 run_dir=runs/allreduce "$@"

# two machines (run on each; NODE_RANK=0 on the host at $MASTER_ADDR):
# torchrun --nnodes 2 --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port 29500 \
#   --nproc-per-node 1 -m dpeft_launch.torchrun_allreduce --config launch/ray-run.yaml
