#!/usr/bin/env bash
# The copy warm-up recipe of docs/results.md ("The recipe that works"), in two commands: a model without memory first
# learns to copy from its own context on documents whose blocks of lines are written twice, then each
# variant continues from those weights on an ordinary corpus for the same tokens in the same order.
#
#   benchmarks/copy_warmup.sh warmup
#   benchmarks/copy_warmup.sh pair CORPUS DATA_SEED VARIANT [VARIANT ...]
#   benchmarks/copy_warmup.sh pair stdlib 1 nomemory memory1536-layer4-scalarlr10 xl memory1536-layer4-scalarlr10-xl
#   EVAL_ARGS="--max-steps 30" benchmarks/copy_warmup.sh pair go-stdlibtok 1 nomemory memory1536-layer4-scalarlr10
#   WARMUP_SEED=4321 benchmarks/copy_warmup.sh warmup; WARMUP_SEED=4321 benchmarks/copy_warmup.sh pair stdlib 1 ...
#
# warmup: the copy corpus data/stdlib-copies (from data/stdlib, built by `megatron-memorizing-data
#   build`), warm-up A (500 steps of 16 documents x 256 tokens, the usual schedule) to
#   runs/copywarm/copies-500, and warm-up B from A (1,000 steps at lr 2e-3 -> 1e-3) to runs/copywarm/copies-2500.
# pair: PAIR_STEPS (default 500) steps per variant from B's step-1,000 weights on data/CORPUS, which must
#   share data/stdlib's tokenizer (`megatron-memorizing-data build --preset go --tokenizer
#   data/stdlib/tokenizer.model --out data/go-stdlibtok`), with `--set data.seed=DATA_SEED`; runs go to
#   runs/NAME/VARIANT and evaluations to runs/eval/NAME/VARIANT, NAME defaulting to
#   copywarm-CORPUS-PAIR_STEPS-dataseedDATA_SEED. EVAL_ARGS adds options to every evaluation.
#   WARMUP_SEED (both commands) draws the warm-up's initial weights with `--set training.seed=WARMUP_SEED`
#   and keeps it apart: runs/copywarm-seedWARMUP_SEED, and pairs named copywarm-seedWARMUP_SEED-CORPUS-....
#   EXIT_MINUTES stops each variant's training after that many minutes with a checkpoint: the same
#   command continues it, and its evaluation waits for its last step. The quarters' checkpoints
#   (for the gain over training) are kept beside those of a dozen stops (checkpoint.keep_last=12).
#
# Variants: nomemory; memory1536-layer4 (memory of 1,536 in layer 4, where the lookup heads form);
# memory1536-layer4-scalarlr10 (and its gate and scale at 10x the learning rate); xl and
# memory1536-layer4-scalarlr10-xl (the same with the Transformer-XL cache); reference1792 (no memory,
# segments of 1,792 = 256 + 1,536 tokens: the long-context reference, trained as such on the same tokens).
set -euo pipefail
bin=${VENV:-.venv}/bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
train() { "$bin/megatron-memorizing-train" --config configs/tiny-cpu.yaml --set model.micro_batch_size=16 "$@"; }
warmup_dir=runs/copywarm${WARMUP_SEED:+-seed$WARMUP_SEED}
usage() { sed -n 5,8p "$0" | sed 's/^# *//' >&2; exit 2; }

warmup() {
    if [[ ! -f data/stdlib-copies/validation.idx ]]; then
        mkdir -p data/stdlib-copies
        for split in train validation; do
            "$bin/megatron-memorizing-data" copies --input data/stdlib/corpus/$split.jsonl --output data/stdlib-copies/$split.jsonl
            "$bin/megatron-memorizing-data" preprocess --input data/stdlib-copies/$split.jsonl \
                --tokenizer data/stdlib/tokenizer.model --output-prefix data/stdlib-copies/$split
        done
    fi
    local copies=(--set data.train=data/stdlib-copies/train --set data.validation=data/stdlib-copies/validation
                  --set "model.memory_layers=[]" --set checkpoint.interval=250 --set checkpoint.keep_last=8)
    if [[ -n ${WARMUP_SEED:-} ]]; then copies+=(--set training.seed="$WARMUP_SEED"); fi
    train "${copies[@]}" --set training.steps=500 --set optimizer.warmup_steps=100 \
        --set checkpoint.dir=$warmup_dir/copies-500/checkpoints --set logging.dir=$warmup_dir/copies-500
    # the first 1,000 steps of a 2,000-step schedule: the lookup forms between steps 450 and 750
    train "${copies[@]}" --set training.steps=1000 --set optimizer.decay_steps=1950 --set optimizer.warmup_steps=50 \
        --set optimizer.min_lr=1e-3 --set data.seed=1 --set training.eval_interval=250 \
        --set checkpoint.init_from=$warmup_dir/copies-500/checkpoints \
        --set checkpoint.dir=$warmup_dir/copies-2500/checkpoints --set logging.dir=$warmup_dir/copies-2500
}

pair() {
    (($# >= 3)) || usage
    local corpus=$1 seed=$2; shift 2
    local steps=${PAIR_STEPS:-500}
    local name=${NAME:-${warmup_dir#runs/}-$corpus-$steps-dataseed$seed}
    local memory=(--set model.memory_size=1536 --set "model.memory_layers=[4]")
    local faster=(--set optimizer.memory_scalars_lr_mult=10)
    local variant args sizes
    for variant in "$@"; do
        # the reference reads 7x longer segments: 7x fewer steps for the same tokens
        local segment=256 variant_steps=$steps
        case $variant in
            nomemory)                        args=(--set "model.memory_layers=[]") ;;
            memory1536-layer4)               args=("${memory[@]}") ;;
            memory1536-layer4-scalarlr10)    args=("${memory[@]}" "${faster[@]}") ;;
            xl)                              args=(--set "model.memory_layers=[]" --set model.xl_cache=true) ;;
            memory1536-layer4-scalarlr10-xl) args=("${memory[@]}" "${faster[@]}" --set model.xl_cache=true) ;;
            reference1792)                   segment=1792 variant_steps=$((steps * 256 / 1792))
                                             args=(--set "model.memory_layers=[]" --set training.eval_segments=6) ;;
            *) echo "unknown variant '$variant' (see the header of $0)" >&2; exit 2 ;;
        esac
        sizes=()
        [[ $variant == memory* ]] && sizes=(--memory-sizes 1536 8192)
        local quarter=$(((variant_steps + 3) / 4))
        train --set data.train=data/$corpus/train --set data.validation=data/$corpus/validation \
            --set model.segment_length=$segment --set training.steps=$variant_steps \
            --set optimizer.lr=6e-4 --set optimizer.warmup_steps=$((variant_steps / 10)) --set data.seed="$seed" \
            --set training.eval_interval=$quarter --set checkpoint.interval=$quarter \
            --set checkpoint.keep_last=12 --set checkpoint.init_from=$warmup_dir/copies-2500/checkpoints/iter_0001000 \
            --set checkpoint.dir=runs/$name/$variant/checkpoints --set logging.dir=runs/$name/$variant \
            --set training.exit_duration_minutes="${EXIT_MINUTES:-0}" "${args[@]}"
        local reached
        reached=$(cat runs/$name/$variant/checkpoints/latest_checkpointed_iteration.txt)
        if ((reached < variant_steps)); then
            echo "$variant: at step $reached of $variant_steps; the same command continues it" >&2
            continue
        fi
        # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
        "$bin/megatron-memorizing-eval" --checkpoint runs/$name/$variant/checkpoints "${sizes[@]}" ${EVAL_ARGS:-} \
            --out runs/eval/$name/$variant
    done
}

case ${1:-} in
    warmup) warmup ;;
    pair) shift; pair "$@" ;;
    *) usage ;;
esac
