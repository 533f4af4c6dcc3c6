#!/usr/bin/env bash
# Train on this machine's CPU cores over gloo: N ranks (default 2), with torchrun or the deepspeed launcher.
#
#   launch_scripts/local_cpu.sh configs/tiny-cpu.yaml                     # torchrun, 2 ranks (DP=2)
#   NPROC=4 launch_scripts/local_cpu.sh configs/tiny-cpu.yaml --set model.tensor_model_parallel_size=2 --set model.pipeline_model_parallel_size=2
#   LAUNCHER=deepspeed launch_scripts/local_cpu.sh configs/tiny-cpu.yaml  # deepspeed --num_gpus 2 (CPU ranks)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/environment.sh"
config=${1:?usage: $0 CONFIG.yaml [--set section.field=value ...]}; shift
nproc=${NPROC:-2}
# Several ranks share few cores: one thread each keeps them from fighting.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "${LAUNCHER:-torchrun}" in
  torchrun)  exec python3 -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m megatron_memorizing.train --config "$config" "$@" ;;
  deepspeed) exec deepspeed --num_gpus "$nproc" --module megatron_memorizing.train --config "$config" "$@" ;;
  *) echo "LAUNCHER must be torchrun or deepspeed" >&2; exit 2 ;;
esac
