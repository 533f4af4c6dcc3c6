#!/usr/bin/env bash
# The paper's "fine-tune a vanilla pretrained model to use memory", through Hugging Face and back
# (docs/campaigns/2026-12-01-pretrained-hf-finetune.md):
#   pretrain   a vanilla Llama-shaped tiny-cpu model (RMSNorm, SwiGLU, no biases) on CORPUS for
#              STEPS steps, evaluate it, and export it as a standard LlamaForCausalLM (no remote code);
#   VARIANT    import that Hugging Face directory (memory1536: a memory layer added at layer 3;
#              nomemory: as it is), fine-tune it FINETUNE_STEPS more steps (default 1000) on the
#              same data, and evaluate it.
#
#   benchmarks/finetune_pretrained.sh stdlib 4000 pretrain
#   benchmarks/finetune_pretrained.sh stdlib 4000 memory1536 &   # the two fine-tunes side by side
#   benchmarks/finetune_pretrained.sh stdlib 4000 nomemory
#
# Runs go to runs/pretrained-CORPUS-STEPS/, evaluations to runs/eval/pretrained-CORPUS-STEPS/.
# Every stage resumes or skips what is already there. One thread per run.
set -euo pipefail
corpus=$1 steps=$2; shift 2
bin=${VENV:-.venv}/bin
root=runs/pretrained-$corpus-$steps
evals=runs/eval/pretrained-$corpus-$steps
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
data=(--set data.train=data/$corpus/train --set data.validation=data/$corpus/validation)

for stage in "$@"; do
    case $stage in
        pretrain)
            "$bin/megatron-memorizing-train" --config configs/tiny-cpu.yaml "${data[@]}" \
                --set model.normalization=RMSNorm --set model.activation=silu --set model.gated_linear_unit=true \
                --set model.add_bias_linear=false --set "model.memory_layers=[]" \
                --set training.steps="$steps" --set optimizer.warmup_steps=100 \
                --set checkpoint.interval=500 --set checkpoint.keep_last=8 \
                --set checkpoint.dir=$root/vanilla/checkpoints --set logging.dir=$root/vanilla
            "$bin/megatron-memorizing-eval" --checkpoint $root/vanilla/checkpoints --out $evals/vanilla
            "$bin/megatron-memorizing-export" --checkpoint $root/vanilla/checkpoints --output $root/vanilla-hf --overwrite
            continue ;;
        memory1536) layers="[3]" ;;
        nomemory)   layers="[]" ;;
        *) echo "unknown stage '$stage' (see the header of $0)" >&2; exit 2 ;;
    esac
    imported=$root/imported-$stage
    [[ -d $imported ]] || "$bin/megatron-memorizing-import" --hf-model $root/vanilla-hf --output $imported \
        --set "model.memory_layers=$layers" --set model.memory_size=1536 --set model.segment_length=256 \
        --set model.micro_batch_size=4
    "$bin/megatron-memorizing-train" --config $imported/iter_0000000/config.yaml "${data[@]}" \
        --set training.steps="${FINETUNE_STEPS:-1000}" --set optimizer.lr=6.0e-4 --set optimizer.min_lr=6.0e-5 \
        --set optimizer.warmup_steps=50 --set training.eval_interval=100 --set training.eval_segments=40 \
        --set checkpoint.interval=500 --set checkpoint.dir=$root/finetune-$stage/checkpoints \
        --set logging.dir=$root/finetune-$stage
    "$bin/megatron-memorizing-eval" --checkpoint $root/finetune-$stage/checkpoints --memory-sizes 1536 8192 \
        --out $evals/finetune-$stage
done
