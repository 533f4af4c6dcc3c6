#!/usr/bin/env bash
# Train on the GPUs of one node with the deepspeed launcher (NCCL).
#
#   launch_scripts/gpu_node.sh configs/paper-8k.yaml                # all GPUs of the node
#   NUM_GPUS=4 launch_scripts/gpu_node.sh configs/paper-8k.yaml --set model.tensor_model_parallel_size=2
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/environment.sh"
config=${1:?usage: $0 CONFIG.yaml [--set section.field=value ...]}; shift
num_gpus=${NUM_GPUS:-$(nvidia-smi -L | wc -l)}
exec deepspeed --num_gpus "$num_gpus" --module megatron_memorizing.train --config "$config" "$@"
