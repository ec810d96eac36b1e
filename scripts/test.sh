#!/usr/bin/env bash
# Install (scripts/install.sh) and run the whole test suite, two workers, one thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1 KERAS_BACKEND=torch WANDB_SILENT=true
exec .venv/bin/python -m pytest -n 2 -p no:cacheprovider "$@"
