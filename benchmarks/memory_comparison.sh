#!/usr/bin/env bash
# The side-by-side comparison of docs/results.md: trains each variant of the tiny-cpu model on one
# corpus for the same number of steps, one run after another, then evaluates each on the
# corpus's validation split (memory sizes up to 32K, memory disabled, by position).
#
#   benchmarks/memory_comparison.sh CORPUS STEPS VARIANT [VARIANT ...]
#   benchmarks/memory_comparison.sh stdlib 1000 nomemory memory1536 memory8192 xl-inputs memory1536-xl-inputs
#   benchmarks/memory_comparison.sh stdlib 1000 finetune-memory1536 finetune-nomemory
#
# The finetune-* variants start from the nomemory run's weights (train that first) and train
# FINETUNE_STEPS more (default 500) at a lower learning rate, validating every 100 steps: with
# a memory layer added (the paper's "fine-tune a vanilla model to use memory"), and without one
# (the same extra training, the fair baseline).
#
# CORPUS is a directory under data/ built by `megatron-memorizing-data build [--preset ...]`.
# Runs go to runs/cmp-CORPUS-STEPS[-TAG]/VARIANT, evaluations to runs/eval/cmp-CORPUS-STEPS[-TAG]/VARIANT.
# SET adds overrides to every variant of one comparison, TAG names it:
#   TAG=lr5e-4 SET="optimizer.lr=5e-4 optimizer.min_lr=5e-5" benchmarks/memory_comparison.sh stdlib 500 nomemory xl-inputs
# One thread per run: two instances side by side use two cores.
set -euo pipefail
corpus=$1 steps=$2; shift 2
bin=${VENV:-.venv}/bin
name=cmp-$corpus-$steps${TAG:+-$TAG}
root=runs/$name
common=()
for override in ${SET:-}; do common+=(--set "$override"); done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
finetune=(--set checkpoint.init_from=$root/nomemory/checkpoints --set training.steps=${FINETUNE_STEPS:-500}
          --set optimizer.lr=6.0e-4 --set optimizer.warmup_steps=50 --set training.eval_interval=100)

for variant in "$@"; do
    case $variant in
        nomemory)            args=(--set "model.memory_layers=[]") ;;
        memory1536)          args=(--set model.memory_size=1536) ;;
        memory8192)          args=(--set model.memory_size=8192) ;;
        memory1536-softmax)  args=(--set model.memory_size=1536 --set model.memory_mixing=softmax) ;;
        xl-inputs)           args=(--set "model.memory_layers=[]" --set model.xl_cache=true) ;;
        memory1536-xl-inputs) args=(--set model.memory_size=1536 --set model.xl_cache=true) ;;
        finetune-memory1536) args=(--set model.memory_size=1536 "${finetune[@]}") ;;
        finetune-nomemory)   args=(--set "model.memory_layers=[]" "${finetune[@]}") ;;
        *) echo "unknown variant '$variant' (see the header of $0)" >&2; exit 2 ;;
    esac
    run=$root/$variant
    "$bin/megatron-memorizing-train" --config configs/tiny-cpu.yaml \
        --set data.train=data/$corpus/train --set data.validation=data/$corpus/validation \
        --set training.steps="$steps" --set optimizer.warmup_steps=100 \
        --set checkpoint.interval=500 --set checkpoint.dir=$run/checkpoints --set logging.dir=$run \
        "${common[@]}" "${args[@]}"
    "$bin/megatron-memorizing-eval" --checkpoint $run/checkpoints --memory-sizes 1536 8192 32768 \
        --out runs/eval/$name/$variant
done
