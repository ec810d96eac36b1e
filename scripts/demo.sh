#!/usr/bin/env bash
# Install (scripts/install.sh) and audit the example trainings: verdicts on the terminal, a JSON
# report, plots and an offline W&B run per training under mlrepro-out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1
exec .venv/bin/mlrepro audit --catalog fixtures/catalog.json --expect --out mlrepro-out "$@"
