# Sourced by the launch scripts: run with the project's virtual environment unless one is active.
# `make setup` (or `make train` / `make test`) creates .venv; VENV=DIR picks another one, e.g.
# VENV=.venv-py312 (relative to the repository).
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  _root=${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
  _venv=${VENV:-.venv}
  [[ "$_venv" = /* ]] || _venv="$_root/$_venv"
  if [[ -x "$_venv/bin/python" ]]; then
    export VIRTUAL_ENV=$_venv PATH="$_venv/bin:$PATH"
  elif ! python3 -c "import torch, megatron.core, deepspeed" 2>/dev/null; then
    echo "error: no Python environment with megatron-memorizing's dependencies ($_venv does not exist): run 'make setup' in the repository, or activate your own environment" >&2
    exit 2
  fi
  unset _root _venv
fi
