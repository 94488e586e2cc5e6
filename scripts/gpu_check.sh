#!/usr/bin/env bash
# The CUDA paths no CPU test reaches, on one GPU in <= 8 minutes; one JSON summary line on stdout.
#
#   scripts/gpu_check.sh                 # on a GPU machine
#   scripts/gpu_check.sh --dry-run       # the same code at tiny sizes on the CPU
#   scripts/gpu_check.sh --only steps fp16_overflow
#
# What it runs and reports: launch/gpu_check.py (its docstring). Python: MMVAE_PYTHON, else
# .venv/bin/python, else python3. Exit code 0 when every section that ran passed.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z ${MMVAE_PYTHON:-} ]]; then
    MMVAE_PYTHON=python3
    [[ -x .venv/bin/python ]] && MMVAE_PYTHON=.venv/bin/python
fi
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$MMVAE_PYTHON" launch/gpu_check.py "$@"
