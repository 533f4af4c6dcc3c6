#!/usr/bin/env bash
# Wheels for the GPU check machine (Python 3.12, x86_64 Linux, no network): everything the plugin
# needs that the machine lacks, at the versions of the Python 3.12 line (constraints/py312.txt).
#
#   make wheelhouse              # -> wheelhouse/ (ignored by git; carried to the GPU machine)
#
# The GPU machine has torch, triton, transformers, sentencepiece, tensorboard, safetensors, psutil,
# numpy, pyyaml, tqdm, packaging and pytest. Carried here: megatron-core, deepspeed (built without
# compiled ops: they JIT-compile on first use), their pure-Python and small compiled dependencies,
# and the project itself. Not carried: faiss (the GPU benchmarks run without it; a faiss-gpu wheel
# is larger than what travels) and matplotlib (plots are not part of the check).
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/find_python.sh
out=${1:-wheelhouse}
limit_mib=${WHEELHOUSE_LIMIT_MIB:-56}   # what travels with the working tree is 64 MiB in all
venv=.venv-py312
make setup PYTHON="$(find_python 3.12)" VENV="$venv" >/dev/null
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)

staging="$out.tmp"
rm -rf "$staging"
mkdir -p "$staging"
"${pip[@]}" download --no-deps -d "$staging" -c constraints/py312.txt --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  megatron-core hjson msgpack ninja py-cpuinfo pydantic pydantic-core annotated-types typing-inspection einops
DS_BUILD_OPS=0 "${pip[@]}" wheel --no-deps -w "$staging" -c constraints/py312.txt deepspeed
"${pip[@]}" wheel --no-deps -w "$staging" .
touch "$staging/.made-by-build_wheelhouse"

size_mib=$(( $(du -sb "$staging" | cut -f1) / 1048576 ))
if (( size_mib > limit_mib )); then
  echo "error: the wheelhouse is ${size_mib} MiB, over ${limit_mib} MiB: it would not travel" >&2
  exit 1
fi
# Replace only a wheelhouse this script made.
if [[ -e "$out" && ! -e "$out/.made-by-build_wheelhouse" ]]; then
  echo "error: $out exists and was not made by this script: move it away" >&2
  exit 2
fi
rm -rf "$out"
mv "$staging" "$out"
ls -1 "$out" | sed 's/^/  /'
echo "$out: $(ls "$out"/*.whl | wc -l) wheels, ${size_mib} MiB"
