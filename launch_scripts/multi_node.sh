#!/usr/bin/env bash
# Train across nodes with the deepspeed launcher.
#
# With pdsh and passwordless ssh (the launcher starts every node from here):
#   HOSTFILE=hostfile launch_scripts/multi_node.sh configs/paper-8k.yaml
#   where hostfile has one line per node:  node1 slots=8
#
# Without pdsh/ssh (clusters that start one command per node themselves): run on EVERY node,
# with that node's rank, the same master address and the same hostfile:
#   NODE_RANK=0 MASTER_ADDR=node1 HOSTFILE=hostfile launch_scripts/multi_node.sh configs/paper-8k.yaml
#   NODE_RANK=1 MASTER_ADDR=node1 HOSTFILE=hostfile launch_scripts/multi_node.sh configs/paper-8k.yaml
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/environment.sh"
config=${1:?usage: $0 CONFIG.yaml [--set section.field=value ...]}; shift
hostfile=${HOSTFILE:?set HOSTFILE to a deepspeed hostfile (one "host slots=N" line per node)}
port=${MASTER_PORT:-29500}
if [[ -n "${NODE_RANK:-}" ]]; then
  exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node 0}" --master_port "$port" \
    --module megatron_memorizing.train --config "$config" "$@"
fi
exec deepspeed --hostfile "$hostfile" --master_port "$port" --module megatron_memorizing.train --config "$config" "$@"
