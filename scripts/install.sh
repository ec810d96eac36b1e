#!/usr/bin/env bash
# Create .venv and install pytest-mlrepro with everything its tests and the example audit need.
# torch is pinned to 2.13.0 first (the local CPU wheel on our machines) and constrained after, so
# no step can pull a multi-GB CUDA build of a newer torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q torch==2.13.0
$PIP install -q -c constraints.txt -e ".[test,lightning,keras,transformers,reports,fastai-deps]"
# fastai's declared requirements drag in torchvision and a CUDA torch: install it without them
# (its tracker callbacks and tabular learner need only what fastai-deps lists).
$PIP install -q -c constraints.txt --no-deps fastai fastcore fastprogress fasttransform fastdownload
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__)"
