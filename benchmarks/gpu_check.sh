#!/usr/bin/env bash
# The GPU check, in one call on a bare GPU machine with no network:
#
#   make wheelhouse                          # here, first: wheels for what that machine lacks
#   benchmarks/gpu_check.sh OUTDIR           # there, from the repository root (wheelhouse/ carried along)
#
# 1. install  megatron-core, deepspeed, their missing dependencies and the project: exactly the
#             wheels of wheelhouse/, offline, without resolving anything (the machine's torch stays)
# 2. env      versions, the GPU, the driver                                     -> env.txt
# 3. tests    the suite's GPU tests (pytest -m gpu: tests/test_gpu.py)          -> gpu_tests.xml
# 4. step     stock Megatron GPT vs the memorizing model, hidden 1024, 16 heads, segment 512,
#             8 slots, 12 layers with kNN memory in one, M = 8K, 65K, 262K      -> step_gpu.md
# 5. search   the search alone by memory size, time and peak memory            -> search_gpu.md
# 6. data     the CPython-stdlib corpus, built on the machine (vocab 8000)
# 7. train    200 steps of configs/paper-8k.yaml on it: tokens/s, GPU memory    -> train_gpu.md
# Everything printed goes to log.txt, and each part's exit code and time to summary.md: at most 8
# files in OUTDIR. Each part has its own time limit (in all 8 minutes), so one hang cannot take the
# others' time. Without CUDA (a dry run) the GPU parts say "skipped: no CUDA" and exit 0.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
python=${PYTHON:-python3}
wheels=$(cd "${WHEELHOUSE:-wheelhouse}" 2>/dev/null && pwd) || { echo "error: no wheelhouse: run 'make wheelhouse' first" >&2; exit 2; }
work=$(mktemp -d)
exec > >(tee "$out/log.txt") 2>&1
printf '| part | exit | seconds | limit |\n|---|---:|---:|---:|\n' > "$out/summary.md"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1 PIP_BREAK_SYSTEM_PACKAGES=1

part() {  # part NAME LIMIT_SECONDS 'COMMAND': run in bash, where this script's functions are exported
  local name=$1 limit=$2 start=$SECONDS rc
  echo "=== $name (limit ${limit} s) ==="
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$3"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - start)) s ==="
  echo "| $name | $rc | $((SECONDS - start)) | $limit |" >> "$out/summary.md"
}

on_gpu() {  # on_gpu COMMAND...: the command where CUDA is, else a line saying it was skipped
  if "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$@"
  else
    echo "skipped: no CUDA"
  fi
}

install() {  # exactly the wheels of the wheelhouse, nothing resolved: the machine's torch stays
  "$python" -m pip install --no-index --no-deps "$wheels"/*.whl &&
  "$python" -m pip check | grep -v -e matplotlib -e faiss || true   # what is still missing, for the log
}

environment() {
  "$python" - <<'PY'
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

print(f"python {platform.python_version()} on {platform.platform()}")
for name in ("torch", "megatron-core", "deepspeed", "transformers", "megatron-memorizing"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name} not installed")
print(f"cuda {torch.version.cuda}, available: {torch.cuda.is_available()}")
for i in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {props.name}, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}")
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
}

train() {
  "$python" -m megatron_memorizing.train --config configs/paper-8k.yaml \
    --set training.steps=200 --set optimizer.warmup_steps=20 --set logging.interval=20 \
    --set data.train="$work/stdlib/train" --set data.validation="$work/stdlib/validation" \
    --set model.vocab_size=8000 --set training.eval_segments=4 --set training.eval_interval=0 \
    --set checkpoint.dir="$work/run/checkpoints" --set checkpoint.interval=200 --set logging.dir="$work/run" \
    | tee "$work/train.log"
  local rc=${PIPESTATUS[0]}
  {
    echo "200 steps of configs/paper-8k.yaml on one GPU (stdlib corpus, vocab 8000; 8 slots x 512 tokens a step)"
    echo
    echo '```'
    grep -E "^step |validation|trained" "$work/train.log"
    echo '```'
  } > "$out/train_gpu.md"
  return "$rc"
}

export -f on_gpu install environment train
export python wheels work out
part install 60 'install'
part env 15 'environment > "$out/env.txt"; cat "$out/env.txt"'
part tests 170 '"$python" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider --junitxml="$out/gpu_tests.xml"'
part step 60 'on_gpu "$python" benchmarks/bench_step.py --sizes 8192 65536 262144 --layers 12 --hidden 1024 \
  --heads 16 --segment 512 --batch 8 --bf16 --memory-dtype bfloat16 --repeats 5 | tee "$out/step_gpu.md"'
part search 40 'on_gpu "$python" benchmarks/bench_search.py --device cuda --sizes 8192 65536 262144 --heads 16 \
  --head-dim 64 --queries 512 | tee "$out/search_gpu.md"'
part data 40 '"$python" -m data_tools.cli build --out "$work/stdlib" --workers 8'
part train 90 'on_gpu train'
cat "$out/summary.md"
rm -rf "$work"
