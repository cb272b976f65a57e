#!/usr/bin/env bash
# One `accelerate launch` per node of a SLURM allocation, with multi_node.yaml: srun starts this script
# once per node, each node gets its own --machine_rank, the allocation's first node is the rendezvous.
#   srun --nodes 2 --ntasks-per-node 1 bash params/accelerate/slurm.sh -m kvlib.launch --params P --group G1 --seed 0
# or, for the pipeline's train stage, in the params: launch: srun --nodes 2 --ntasks-per-node 1 bash params/accelerate/slurm.sh
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
gpus_per_node=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}
exec accelerate launch --config_file "$(dirname "$0")/multi_node.yaml" \
  --num_machines "$SLURM_NNODES" --num_processes $((SLURM_NNODES * gpus_per_node)) \
  --machine_rank "$SLURM_NODEID" --main_process_ip "$head_node" --main_process_port "${MASTER_PORT:-29500}" "$@"
